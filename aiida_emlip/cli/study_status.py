"""``aiida-emlip status`` and ``list``: what a study is doing, and what the profile holds."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from aiida import orm
from aiida.common.links import LinkType

from aiida_emlip.cli.study_common import STUDY_ENTRY_POINT
from aiida_emlip.workflows.label_runs import LABEL_PREFIX, pw_of
from aiida_emlip.workflows.reuse import REUSED_FROM_EXTRA

PW_PROCESS = "aiida.calculations:quantumespresso.pw"
#: emlip-train's epoch line: ``epoch N (stage[, scf mode]) train L valid L ...`` (the mode for SCF heads)
EPOCH_LINE = re.compile(r"epoch (\d+) \(([^,)]+)(?:, \w+)?\) train (\S+) valid (\S+)")


def _state(node: orm.ProcessNode) -> str:
    if node.is_finished_ok:
        return "finished"
    if node.is_finished:
        return f"failed ({node.exit_status})"
    if node.is_excepted:
        return "excepted"
    if node.is_killed:
        return "killed"
    if node.process_state is None:
        return "created"
    if isinstance(node, orm.CalcJobNode):  # a job waits on its scheduler: say what the job does
        state = node.get_state()
        return "running" if state is None else state.value.replace("withscheduler", "running")
    return node.process_state.value


def _ended_early(node: orm.ProcessNode) -> bool:
    """Killed (``verdi process kill``) or excepted: the process ran none of its remaining steps."""
    return node.is_killed or node.is_excepted


def _why_ended(node: orm.ProcessNode) -> str | None:
    """Why a killed or excepted process ended, in one line (never a traceback)."""
    if node.is_excepted:
        lines = [line for line in (node.exception or "").strip().splitlines() if line.strip()]
        return lines[-1].strip() if lines else None
    return node.process_status or None


def _child(node: orm.ProcessNode, link_label: str) -> orm.ProcessNode | None:
    for link in node.base.links.get_outgoing(link_type=(LinkType.CALL_WORK, LinkType.CALL_CALC)).all():
        if link.link_label == link_label:
            return link.node
    return None


def _training_node(training: orm.ProcessNode, label: str) -> orm.ProcessNode | None:
    """The design's last ``emlip.train`` calculation; its restart workchain while that has none yet."""
    node = _child(training, f"train_{label}")
    if node is None or isinstance(node, orm.CalcJobNode):
        return node
    calcs = [n for n in node.called if isinstance(n, orm.CalcJobNode)]
    return max(calcs, key=lambda n: n.ctime) if calcs else node


def _epoch_text(text: str) -> str | None:
    matches = EPOCH_LINE.findall(text.replace("\r", "\n"))
    if not matches:
        return None
    epoch, stage, _, valid = matches[-1]
    return f"epoch {epoch} ({stage}), validation loss {valid}"


def _remote_epoch(job: dict[str, Any]) -> str | None:
    """The last epoch line of a running training job, read from its working directory.

    Runs after the database transaction has ended: on a SQLite profile a long read would hold the lock
    that the running study needs to write.
    """
    workdir = job.get("workdir")
    if not workdir:
        return None
    for name in ("train.log", "stdout"):
        try:
            if job["transport"] == "core.local":
                text = (Path(workdir) / name).read_text(errors="replace")
            else:
                computer = orm.load_computer(job["computer"])
                with computer.get_transport() as transport, tempfile.TemporaryDirectory() as tmp:
                    transport.getfile(f"{workdir}/{name}", str(Path(tmp) / name))
                    text = (Path(tmp) / name).read_text(errors="replace")
        except Exception:  # not written yet, or the computer is not reachable
            continue
        found = _epoch_text(text)
        if found:
            return found
    return None


def end_read() -> None:
    """End the session's read transaction (releases SQLite's shared lock)."""
    from aiida.manage import get_manager

    try:
        get_manager().get_profile_storage().get_session().rollback()
    except Exception:  # a storage without sessions
        pass


def _epochs(config: dict[str, Any]) -> int:
    return sum(int(stage.get("epochs", 0)) for stage in config.get("stages", []))


def _ended_text(node: orm.ProcessNode) -> str:
    """``killed``, ``failed (N): message`` ...: the state, with the exit message when there is one."""
    return f"{_state(node)}: {node.exit_message}" if node.exit_message else _state(node)


def training_lines(
    training: orm.ProcessNode | None, designs: list[str], not_started: str = "waiting"
) -> list[Any]:
    """One line per design: waiting, running (epoch, validation loss) or finished (cost, loss).

    ``not_started`` is what a design without a calculation shows: ``not run`` once the study has ended.
    """
    lines = []
    for label in designs:
        calc = _training_node(training, label) if training is not None else None
        if calc is None or (not isinstance(calc, orm.CalcJobNode) and not calc.is_terminated):
            lines.append(f"  {label:<12} {not_started}")
            continue
        if not isinstance(calc, orm.CalcJobNode):  # the restart workchain stopped before a calculation
            lines.append(f"  {label:<12} {_ended_text(calc)}")
            continue
        total = _epochs(calc.inputs.config.get_dict())
        if calc.is_finished_ok:
            metrics = calc.outputs.metrics.get_dict()
            history = metrics.get("history") or [{}]
            loss = history[-1].get("valid_loss")
            cached = " (from cache)" if calc.base.caching.is_created_from_cache else ""
            lines.append(
                f"  {label:<12} finished: {metrics.get('epochs')}/{total} epochs, validation loss "
                f"{loss:.4g}, {metrics.get('wall_time_s', 0):.0f} s{cached}"
            )
        elif calc.is_terminated:
            lines.append(f"  {label:<12} {_ended_text(calc)}")
        else:
            job = {
                "workdir": calc.get_remote_workdir(),
                "transport": calc.computer.transport_type,
                "computer": calc.computer.label,
            }
            lines.append(RemoteLine(f"  {label:<12} {_state(calc)}: ", f" of {total} epochs", job))
    return lines


class RemoteLine:
    """A status line whose middle is read from a running job's folder once the database is released."""

    def __init__(self, head: str, tail: str, job: dict[str, Any]) -> None:
        self.head, self.tail, self.job = head, tail, job

    def render(self) -> str:
        return f"{self.head}{_remote_epoch(self.job) or 'starting'}{self.tail}"


def render(lines: list[Any]) -> list[str]:
    """Release the database, then read the running jobs' folders."""
    end_read()
    return [line.render() if isinstance(line, RemoteLine) else line for line in lines]


def active_learning_line(study: orm.WorkflowNode, options: dict[str, Any]) -> str:
    """Round, pw.x runs and why the loop stopped (from the study's extras)."""
    from aiida_emlip.workflows.study_active import PROGRESS

    progress = study.base.extras.get(PROGRESS, None)
    if not progress:
        return f"Active learning: waiting (at most {options['rounds']} rounds)"
    text = (
        f"Active learning ({progress.get('model')}): round {progress['round']} of at most "
        f"{progress['rounds']}, {progress['dft_calls']} pw.x runs"
    )
    return text + (f"; stopped: {progress['stop']}" if progress.get("stop") else "")


def dft_counts(dft: orm.ProcessNode) -> dict[str, Any]:
    """pw.x configurations of the study's dataset workchain by state.

    While it runs (or once it finished) these are the counts it keeps in its extras; once it was killed
    or excepted they are counted from its ``label_*`` children (one per configuration: its
    ``PwBaseWorkChain``, or the ``EmlipLabelWorkChain`` around it; the extras end at its last step):
    ``done`` (the configuration's ``PwBaseWorkChain`` finished), ``killed``, ``failed`` and ``never
    started``.
    """
    counts = dict(dft.base.extras.get("emlip_progress", {}))
    if not _ended_early(dft):
        return {k: counts.get(k, 0) for k in ("done", "running", "failed", "waiting")} | {
            "total": counts.get("total")
        }
    links = dft.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
    runs = [link.node for link in links if link.link_label.startswith(LABEL_PREFIX)]
    pw_done = [_finished(pw_of(n)) for n in runs]
    done = sum(pw_done)
    killed = sum(1 for n, ok in zip(runs, pw_done) if n.is_killed and not ok)
    total = counts.get("total")
    ended = {"done": done, "killed": killed, "failed": len(runs) - done - killed}
    if total is not None:
        ended["never started"] = max(0, int(total) - len(runs))
    return ended | {"total": total}


def _dft_line(dft: orm.ProcessNode, counts: dict[str, Any]) -> str:
    text = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "total")
    total = counts["total"] if counts.get("total") is not None else "?"
    line = f"DFT <{dft.pk}> {_state(dft)}: {text} of {total} pw.x configurations"
    source = dft.base.extras.get(REUSED_FROM_EXTRA, None)
    if source:
        line += f" (reused from <{orm.load_node(source).pk}>, the same inputs)"
    return line


def lost_lines(study: orm.WorkflowNode, spec: dict[str, Any]) -> list[str]:
    """What a killed or excepted study lost and what it kept, in words."""
    stage = study.base.extras.get("emlip_stage", "not started")
    lost: list[str] = []
    kept: list[str] = []
    dft = _child(study, "dft")
    if dft is None:
        lost.append("every pw.x configuration (none started)")
    elif dft.is_finished_ok:
        kept.append(f"the DFT labels ({len(dft.outputs.dataset)} configurations)")
    else:
        counts = dft_counts(dft)
        missing = {k: v for k, v in counts.items() if k not in ("done", "total") and v}
        total = counts["total"] if counts.get("total") is not None else "?"
        details = ", ".join(f"{v} {k}" for k, v in missing.items())
        lost.append(f"{sum(missing.values())} of {total} pw.x configurations ({details})")
        finished = _finished_pw(dft)
        if finished:
            kept.append(f"{finished} finished pw.x calculations")
    designs = list(spec.get("designs", {}))
    training = _child(study, "training")
    trained = [label for label in designs if training is not None and _trained(training, label)]
    untrained = [label for label in designs if label not in trained]
    if untrained:
        lost.append(f"training of {', '.join(untrained)}")
    if trained:
        kept.append(f"models of {', '.join(trained)}")
    for name in spec.get("validations", {}):
        node = _child(study, f"validate_{name}")
        (kept if node is not None and node.is_finished_ok else lost).append(f"validation {name}")
    evaluated = [label for label in designs if _finished(_child(study, f"evaluate_{label}"))]
    if len(evaluated) < len(designs):
        lost.append("held-out predictions")
    if "report" not in study.outputs:
        lost.append("the report")
    lines = [f"Lost ({_state(study)} at stage {stage}): {'; '.join(lost) or 'nothing'}"]
    if kept:
        lines.append(f"Kept: {'; '.join(kept)} (stored in the profile)")
    return lines


def _finished_pw(node: orm.ProcessNode) -> int:
    """pw.x calculations under ``node`` that finished OK (one may outlive its killed workchain)."""
    return sum(
        1
        for n in node.called_descendants
        if isinstance(n, orm.CalcJobNode) and n.process_type == PW_PROCESS and n.is_finished_ok
    )


def _finished(node: orm.ProcessNode | None) -> bool:
    return node is not None and node.is_finished_ok


def _trained(training: orm.ProcessNode, label: str) -> bool:
    calc = _training_node(training, label)
    return isinstance(calc, orm.CalcJobNode) and calc.is_finished_ok


def status_lines(study: orm.WorkflowNode) -> list[Any]:
    """The live summary of a study; once it was killed or excepted, also what it lost and kept."""
    spec = study.inputs.spec.get_dict()
    stage = study.base.extras.get("emlip_stage", "not started")
    ended = _ended_early(study)
    not_started = "not run" if study.is_terminated else "waiting"
    lines: list[Any] = [f"Study {spec.get('name')!r} <{study.pk}>: {_state(study)} (stage: {stage})"]
    if study.exit_message:
        lines.append(f"  {study.exit_message}")
    elif ended and (why := _why_ended(study)):
        lines.append(f"  {why}")
    dft = _child(study, "dft")
    if dft is None:
        lines.append(f"DFT: {'not run' if study.is_terminated else 'not started'}")
    else:
        lines.append(_dft_line(dft, dft_counts(dft)))
    if "split" in study.outputs:
        split = study.outputs.split.get_dict()
        lines.append(
            f"Split: {len(split['training_keys'])} to train on, {len(split['held_out_keys'])} held out"
        )
    training = _child(study, "training")
    lines.append(f"Training{f' <{training.pk}>' if training else ''}:")
    lines += training_lines(training, list(spec.get("designs", {})), not_started)
    if spec.get("active_learning"):
        lines.append(active_learning_line(study, spec["active_learning"]))
    validations = list(spec.get("validations", {}))
    if validations:
        lines.append("Validations:")
        for name in validations:
            node = _child(study, f"validate_{name}")
            lines.append(f"  {name:<12} {_ended_text(node) if node else not_started}")
    evaluated = [label for label in spec.get("designs", {}) if _child(study, f"evaluate_{label}")]
    if evaluated:
        done = [label for label in evaluated if _child(study, f"evaluate_{label}").is_finished_ok]
        lines.append(f"Held-out predictions: {len(done)} of {len(spec.get('designs', {}))} designs")
    if "report" in study.outputs:
        lines.append(f"Report: ready (aiida-emlip report {study.pk} --output DIR)")
    if ended:
        lines += lost_lines(study, spec)
    return lines


def list_lines(what: str, limit: int) -> list[str]:
    """Studies, models and datasets, newest first."""
    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.data.model import EmlipModelData

    lines: list[Any] = []
    if what in ("all", "studies"):
        query = orm.QueryBuilder().append(
            orm.WorkflowNode, filters={"process_type": STUDY_ENTRY_POINT}, tag="s"
        )
        nodes = query.order_by({"s": {"ctime": "desc"}}).limit(limit).all(flat=True)
        lines.append(f"Studies ({query.count()}):")
        lines += [f"  {n.pk:>6}  {n.ctime:%Y-%m-%d %H:%M}  {_state(n):<14} {n.label}" for n in nodes]
    if what in ("all", "models"):
        query = orm.QueryBuilder().append(EmlipModelData, tag="m")
        nodes = query.order_by({"m": {"ctime": "desc"}}).limit(limit).all(flat=True)
        lines.append(f"Models ({query.count()}):")
        for n in nodes:
            head = (n.base.attributes.get("head", {}) or {}).get("name", "?")
            elements = ",".join(n.base.attributes.get("elements", []))
            lines.append(f"  {n.pk:>6}  {n.ctime:%Y-%m-%d %H:%M}  head {head:<10} elements {elements}")
    if what in ("all", "datasets"):
        query = orm.QueryBuilder().append(EmlipDatasetData, tag="d")
        nodes = query.order_by({"d": {"ctime": "desc"}}).limit(limit).all(flat=True)
        lines.append(f"Datasets ({query.count()}):")
        for n in nodes:
            charges = ", ".join(f"{q:+g}" for q in n.total_charges)
            lines.append(
                f"  {n.pk:>6}  {n.ctime:%Y-%m-%d %H:%M}  {len(n):>4} configurations, charges {charges}"
            )
    return lines
