"""``aiida-emlip status`` and ``list``: what a study is doing, and what the profile holds."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from aiida import orm
from aiida.common.links import LinkType

from aiida_emlip.cli.study_common import STUDY_ENTRY_POINT

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


def training_lines(training: orm.ProcessNode | None, designs: list[str]) -> list[Any]:
    """One line per design: waiting, running (epoch, validation loss) or finished (cost, loss)."""
    lines = []
    for label in designs:
        calc = _training_node(training, label) if training is not None else None
        if calc is None or (not isinstance(calc, orm.CalcJobNode) and not calc.is_terminated):
            lines.append(f"  {label:<12} waiting")
            continue
        if not isinstance(calc, orm.CalcJobNode):  # the restart workchain stopped before a calculation
            lines.append(f"  {label:<12} {_state(calc)}: {calc.exit_message or ''}")
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
            lines.append(f"  {label:<12} {_state(calc)}: {calc.exit_message or ''}")
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


def status_lines(study: orm.WorkflowNode) -> list[Any]:
    """The live summary of a study."""
    spec = study.inputs.spec.get_dict()
    stage = study.base.extras.get("emlip_stage", "not started")
    lines: list[Any] = [f"Study {spec.get('name')!r} <{study.pk}>: {_state(study)} (stage: {stage})"]
    if study.exit_message:
        lines.append(f"  {study.exit_message}")
    dft = _child(study, "dft")
    if dft is None:
        lines.append("DFT: not started")
    else:
        counts = dft.base.extras.get("emlip_progress", {})
        text = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "running", "failed", "waiting"))
        lines.append(
            f"DFT <{dft.pk}> {_state(dft)}: {text} of {counts.get('total', '?')} pw.x configurations"
        )
    if "split" in study.outputs:
        split = study.outputs.split.get_dict()
        lines.append(
            f"Split: {len(split['training_keys'])} to train on, {len(split['held_out_keys'])} held out"
        )
    training = _child(study, "training")
    lines.append(f"Training{f' <{training.pk}>' if training else ''}:")
    lines += training_lines(training, list(spec.get("designs", {})))
    if spec.get("active_learning"):
        lines.append(active_learning_line(study, spec["active_learning"]))
    validations = list(spec.get("validations", {}))
    if validations:
        lines.append("Validations:")
        for name in validations:
            node = _child(study, f"validate_{name}")
            lines.append(f"  {name:<12} {_state(node) if node else 'waiting'}")
    evaluated = [label for label in spec.get("designs", {}) if _child(study, f"evaluate_{label}")]
    if evaluated:
        done = [label for label in evaluated if _child(study, f"evaluate_{label}").is_finished_ok]
        lines.append(f"Held-out predictions: {len(done)} of {len(spec.get('designs', {}))} designs")
    if "report" in study.outputs:
        lines.append(f"Report: ready (aiida-emlip report {study.pk} --output DIR)")
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
