"""``emlip-train`` and ``emlip-eval``: the trainer and the evaluator as plain command-line tools.

Exit statuses (see :class:`~aiida_emlip.training.errors.ExitCode`): 0 ok (also: nothing left to
train), 1 internal error, 2 usage error, before any compute: bad configuration, data or model file,
an output directory that holds another run, is locked or cannot be written, a corrupt checkpoint or
another run's; also an output that cannot be written; 3 NaN/inf, 4 interrupted by a signal
(checkpoint written when in the training loop), 5 SCF not converged, 6 (emlip-eval) relaxation not
converged, 7 out of memory (host or GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from aiida_emlip.models.file_format import ModelFileError, ModelFileWarning
from aiida_emlip.training.errors import DataWarning, ExitCode, ReferenceEnergyWarning, TrainingError

_TRAIN_OK = "  0  success (or, resuming a finished run, nothing left to train)\n"
_TRAIN_BAD_INPUT = (
    " an output directory that holds another run (without --resume/--overwrite),\n"
    "     is locked by a running emlip-train or cannot be written (also later: disk full); a checkpoint\n"
    "     that is truncated, corrupt or another run's (data, seed or schedule differ)\n"
)
EXIT_HELP = (
    "exit status:\n" + _TRAIN_OK + "  1  internal error (a bug; traceback printed)\n"
    "  2  bad configuration or dataset (unknown key, missing label, wrong units, empty file), before\n"
    "     any compute;"
    + _TRAIN_BAD_INPUT
    + "  3  NaN or inf in the data, the loss or the gradients: stopped cleanly\n"
    "  4  interrupted by SIGTERM/SIGUSR1/SIGINT: during training a checkpoint is written first;\n"
    "     continue with --resume auto\n"
    "  5  a self-consistent head did not converge or diverged (head option on_failure: raise)\n"
    "  7  out of memory (host or GPU): lower data.batch_size\n"
    "With --exit-status-file FILE the status is also written to FILE (also after a usage error).\n"
)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Our own warnings on one line (``warning: ...``); the others as Python prints them."""
    if issubclass(category, (ModelFileWarning, ReferenceEnergyWarning, DataWarning)):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _guard(body: Callable[[], None]) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(body)


#: Messages of the errors torch raises when an allocation fails (CUDA, CPU and MPS allocators).
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (``MemoryError``, ``torch.cuda.OutOfMemoryError``, ...)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in OUT_OF_MEMORY_MESSAGES)


def _run(body: Callable[[], None]) -> int:
    try:
        body()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:
        if is_out_of_memory(exc):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"error: out of memory ({first}); lower data.batch_size", file=sys.stderr)
            return int(ExitCode.OUT_OF_MEMORY)
        traceback.print_exc()
        return int(ExitCode.INTERNAL)
    return int(ExitCode.OK)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emlip-train",
        description=(
            "Train an aiida-emlip model from one YAML configuration (schema: docs/training.md;\n"
            "unknown keys are an error; examples/*.yaml has one per head). Writes to OUTPUT_DIR:\n"
            "model.safetensors, metrics.json, learning_curve.csv, test_errors.txt, checkpoint.pt,\n"
            "config.yaml, train.log (each written atomically) and, while running, the lock file\n"
            "emlip-train.lock. Several GPUs or nodes: launch the same command with torchrun, e.g.\n"
            "  torchrun --nproc_per_node 4 -m aiida_emlip.training.cli train CONFIG.yaml"
        ),
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="YAML configuration file (see examples/*.yaml)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's device")
    parser.add_argument("--output-dir", type=Path, help="overrides the config's output_dir")
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="MODEL",
        help="overrides the config's init_from: start from the weights and reference energies of MODEL "
        "(a model file of the same architecture as the config's model section); optimizer state starts "
        "fresh. With --resume the checkpoint wins (it must have begun from the same MODEL)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue bit-for-bit from a checkpoint of the same data, seed and schedule; 'auto': from "
        "OUTPUT_DIR's checkpoint, or start anew when there is none. A finished run given more epochs "
        "(--epochs or the last stage's) trains them",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="OUTPUT_DIR holds a run: remove the files emlip-train writes there (listed in the log), then "
        "start anew. Without --resume or --overwrite such a directory is refused",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="total epochs: the last stage gets N minus the epochs of the stages before it",
    )
    parser.add_argument(
        "--lr-scale",
        type=float,
        metavar="F",
        help="train with every learning rate (optimizer.lr, the stages' lr) F times the configured one; "
        "with --resume the run continues from where it stands at F times the configured rates. Not "
        "part of the run's identity: the checkpoint records it (default: the checkpoint's, or 1)",
    )
    parser.add_argument("--check", action="store_true", help="validate the config and data, then exit")
    parser.add_argument(
        "--exit-status-file",
        type=Path,
        metavar="FILE",
        help="also write the exit status to FILE when emlip-train ends, whatever the outcome (a batch "
        "job or an AiiDA calculation reads it there)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train with N processes on this machine (one per GPU; gloo on the CPU): emlip-train starts "
        "itself again as 'torchrun --standalone --nproc_per_node N -m aiida_emlip.training.cli train' "
        "with the same arguments (default 1: no torchrun; ignored under torchrun and with --check)",
    )
    return parser


def _status_file_of(argv: Sequence[str]) -> Path | None:
    """``--exit-status-file`` read before the full parse, so a usage error is written there too."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--exit-status-file", type=Path)
    try:
        return pre.parse_known_args(list(argv))[0].exit_status_file
    except SystemExit:  # the option without a value: the full parse reports it
        return None


def write_exit_status(path: Path, status: int) -> None:
    """Write ``status`` to ``path`` (rank 0 only under torchrun); a failure is reported, not raised."""
    from aiida_emlip.training.atomic import write_text_atomic

    if os.environ.get("RANK", "0") != "0":
        return
    try:
        write_text_atomic(path, f"{status}\n")
    except OSError as exc:
        print(f"error: cannot write the exit status to {path}: {exc.strerror or exc}", file=sys.stderr)


def _with_status_file(
    argv: Sequence[str] | None,
    parser: Callable[[], argparse.ArgumentParser],
    make_body: Callable[[argparse.Namespace], Callable[[], None]],
) -> int:
    """Parse ``argv``, run the body under :func:`_guard`, and write the status to ``--exit-status-file``
    whatever happens (a usage error and an interrupt included)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    status_file = _status_file_of(argv)
    if status_file is not None and os.environ.get("RANK", "0") == "0":
        with contextlib.suppress(OSError):  # a stale status (of a requeued job's earlier attempt) goes
            status_file.unlink(missing_ok=True)
    status = int(ExitCode.INTERNAL)
    try:
        args = parser().parse_args(argv)
        status_file = args.exit_status_file
        status = _guard(make_body(args))
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except KeyboardInterrupt:
        status = int(ExitCode.INTERRUPTED)
        raise
    finally:
        if status_file is not None:
            write_exit_status(status_file, status)
    return status


def _relaunch_under_torchrun(nproc_per_node: int, argv: Sequence[str]) -> None:
    """Replace this process by ``torchrun`` starting ``nproc_per_node`` ranks with the same arguments.

    The ranks write the exit status (rank 0) and every file; this process writes nothing more.
    """
    from aiida_emlip.training.launch import torchrun_command

    command = torchrun_command(nproc_per_node, argv)
    print(f"emlip-train: {nproc_per_node} processes: torchrun {' '.join(command[3:])}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def _train_body(args: argparse.Namespace, argv: Sequence[str] = ()) -> Callable[[], None]:
    def body() -> None:
        from aiida_emlip.training.errors import ConfigError
        from aiida_emlip.training.launch import check_nproc_per_node, under_torchrun
        from aiida_emlip.training.session import run_training

        if args.lr_scale is not None and not (math.isfinite(args.lr_scale) and args.lr_scale > 0):
            raise ConfigError(f"--lr-scale must be a positive number, got {args.lr_scale}")
        if args.nproc_per_node is not None:
            problem = check_nproc_per_node(args.nproc_per_node)
            if problem:
                raise ConfigError(f"--nproc-per-node: {problem}")
            if args.nproc_per_node > 1 and not args.check and not under_torchrun():
                _relaunch_under_torchrun(args.nproc_per_node, argv)
        run_training(args)

    return body


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emlip-train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _with_status_file(argv, train_parser, lambda args: _train_body(args, argv))


EVAL_EXIT_HELP = """exit status:
  0  success
  1  internal error (a bug; traceback printed)
  2  bad model file (missing, not a model, truncated or corrupted: checksum mismatch), bad
     structures (unreadable, unknown element, overlapping atoms) or bad parameters; before any
     compute, nothing written
  3  a prediction is NaN or inf (energy, forces, stress, charges, ...): every result is written,
     the message names the structure index and the quantity
  4  interrupted by SIGTERM/SIGUSR1/SIGINT
  5  the SCF of a self-consistent head did not converge for some structure: every result is
     written, that structure flagged scf_converged=False
  6  a relaxation reached max_steps above fmax: results written, flagged relax_converged=False
  7  out of memory (host or GPU): lower --batch-size
With --exit-status-file FILE the status is also written to FILE (also after a usage error).
"""


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emlip-eval",
        description=(
            "Evaluate a trained model (MODEL.safetensors) on the structures of DATA.xyz; total\n"
            "charge, spin, applied field and Fermi level of each come from its extxyz info keys.\n"
            "Modes: single_point (default), relax (ASE FIRE/BFGS, optional cell, fixed atoms) and md\n"
            "(NVE or Langevin). Writes the predictions as extxyz (PREFIX_energy, PREFIX_forces, ...\n"
            "beside the input labels, or the schema keys with --schema-keys) with the metadata\n"
            "model_sha256, eval_mode, scf_converged, scf_iterations, relax_converged, md_step, ...;\n"
            "a JSON summary per structure; in relax/md a trajectory. single_point prints an error\n"
            "table where DATA.xyz has labels. Parameters: --params FILE (YAML/JSON), flags override.\n"
            "Examples:\n"
            "  emlip-eval model.safetensors test.xyz -o pred.xyz --errors errors.json\n"
            "  emlip-eval model.safetensors slab.xyz --mode relax --fmax 0.02 --fix-z-max 3.0\n"
            "  emlip-eval model.safetensors box.xyz --mode md --ensemble langevin --steps 1000"
        ),
        epilog=EVAL_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="model file written by emlip-train (.safetensors)")
    parser.add_argument("data", type=Path, help="extxyz file of structures (labels optional)")
    parser.add_argument(
        "-o", "--output", type=Path, help="predictions extxyz (default: DATA stem + _pred.xyz)"
    )
    parser.add_argument("--errors", type=Path, help="also write the error table as JSON here")
    parser.add_argument("--summary", type=Path, help="JSON summary (default: OUTPUT stem + _summary.json)")
    parser.add_argument(
        "--trajectory", type=Path, help="relax/md trajectory extxyz (default: OUTPUT stem + _traj.xyz)"
    )
    parser.add_argument("--params", type=Path, help="YAML or JSON file of parameters (docs/evaluate.md)")
    parser.add_argument("--mode", choices=["single_point", "relax", "md"], help="default: single_point")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto (CUDA if present)")
    parser.add_argument("--batch-size", type=int, help="structures per batch of single points (default 16)")
    parser.add_argument(
        "--kernels", choices=["e3nn", "cueq"], help="MACE's products: e3nn (default) or cueq (cuEquivariance)"
    )
    parser.add_argument("--prefix", default="emlip", help="prefix of the prediction keys (default: emlip)")
    parser.add_argument(
        "--schema-keys",
        action="store_true",
        help="write predictions under the schema keys (energy, forces, ref_charges, ...) instead",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="SCHEMA=FILE",
        help="label key mapping, e.g. --key energy=REF_energy (repeatable)",
    )
    relax = parser.add_argument_group("relax")
    relax.add_argument("--optimizer", help="FIRE (default) or BFGS")
    relax.add_argument("--fmax", type=float, help="eV/Å (default 0.05)")
    relax.add_argument("--max-steps", type=int, help="default 200")
    relax.add_argument("--relax-cell", action="store_true", default=None, help="also relax the cell")
    md = parser.add_argument_group("md")
    md.add_argument("--ensemble", help="nve (default) or langevin")
    md.add_argument("--timestep-fs", type=float, help="default 0.5")
    md.add_argument("--steps", type=int, help="default 100")
    md.add_argument("--temperature-K", dest="temperature_K", type=float, help="default 300")
    md.add_argument("--friction", type=float, help="Langevin friction in 1/fs (default 0.01)")
    md.add_argument("--seed", type=int, help="velocities and Langevin noise (default 0)")
    both = parser.add_argument_group("relax and md")
    both.add_argument("--trajectory-stride", type=int, help="every n-th step to the trajectory (0: none)")
    both.add_argument("--fix-indices", help="comma-separated indices of fixed atoms, e.g. 0,1,2")
    both.add_argument("--fix-z-min", type=float, help="fix every atom with z >= this (Å; with --fix-z-max)")
    both.add_argument("--fix-z-max", type=float, help="fix every atom with z <= this (Å)")
    parser.add_argument(
        "--exit-status-file",
        type=Path,
        metavar="FILE",
        help="also write the exit status to FILE when emlip-eval ends, whatever the outcome (a batch "
        "job or an AiiDA calculation reads it there)",
    )
    return parser


#: Flags that become parameters (argparse dest → parameter key).
PARAMETER_FLAGS = (
    "mode",
    "device",
    "batch_size",
    "kernels",
    "optimizer",
    "fmax",
    "max_steps",
    "relax_cell",
    "ensemble",
    "timestep_fs",
    "steps",
    "temperature_K",
    "friction",
    "seed",
    "trajectory_stride",
)


def eval_parameters(args: argparse.Namespace) -> dict:
    """The parameter mapping of ``emlip-eval``: the --params file, then the flags given."""
    from aiida_emlip.training.errors import ConfigError
    from aiida_emlip.training.eval_params import load_parameters

    values = load_parameters(args.params) if args.params else {}
    for name in PARAMETER_FLAGS:
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    constraints = dict(values.get("constraints") or {})
    if args.fix_indices is not None:
        try:
            constraints["fixed_indices"] = [int(i) for i in args.fix_indices.split(",") if i.strip()]
        except ValueError:
            raise ConfigError(
                f"--fix-indices expects comma-separated integers, got {args.fix_indices!r}"
            ) from None
    for name in ("z_min", "z_max"):
        value = getattr(args, f"fix_{name}")
        if value is not None:
            constraints[name] = value
    if constraints:
        values["constraints"] = constraints
    return values


def check_outputs_spare_inputs(inputs: Sequence[Path], outputs: Sequence[Path | None]) -> None:
    """Refuse an output path that is one of the inputs (it would destroy the reference labels)."""
    from aiida_emlip.training.errors import ConfigError

    for out in outputs:
        if out is None:
            continue
        for inp in inputs:
            same = Path(out).resolve() == Path(inp).resolve()
            with contextlib.suppress(OSError):  # a hard link is the same file under another name
                same = same or os.path.samefile(out, inp)
            if same:
                raise ConfigError(f"output {out} is the input file {inp}; choose another output path")


def _eval_body(args: argparse.Namespace) -> Callable[[], None]:
    def body() -> None:
        from aiida_emlip.models.file_format import read_metadata
        from aiida_emlip.training.errors import ConfigError
        from aiida_emlip.training.eval_params import parse_parameters

        with warnings.catch_warnings():  # its warnings come once, when the model is loaded
            warnings.simplefilter("ignore", ModelFileWarning)
            read_metadata(args.model)  # a broken model file is refused at once, before torch is imported
        params = parse_parameters(eval_parameters(args))
        keys = {}
        for item in args.key:
            if "=" not in item:
                raise ConfigError(f"--key expects SCHEMA=FILE, got {item!r}")
            schema_key, file_key = item.split("=", 1)
            keys[schema_key] = file_key
        output = args.output or args.data.with_name(args.data.stem + "_pred.xyz")
        # every file written, the default summary and trajectory included (as run_evaluation names them)
        summary = args.summary or output.with_name(output.stem + "_summary.json")
        trajectory = None
        if params.mode != "single_point":
            trajectory = args.trajectory or output.with_name(output.stem + "_traj.xyz")
        check_outputs_spare_inputs([args.data, args.model], [output, args.errors, summary, trajectory])
        from aiida_emlip.training.eval_run import run_evaluation

        report = run_evaluation(
            args.model,
            args.data,
            output,
            params,
            prefix=args.prefix,
            schema_keys=args.schema_keys,
            keys=keys,
            errors_json=args.errors,
            summary_json=args.summary,
            trajectory=args.trajectory,
        )
        print(
            f"wrote {output}, {report.summary_path}"
            + (f", {report.trajectory_path}" if report.trajectory_path else "")
        )
        if report.table:
            print(report.table)
        report.raise_on_failure()

    return body


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emlip-eval``."""
    return _with_status_file(argv, eval_parser, _eval_body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aiida_emlip.training.cli train|eval ...`` (what torchrun launches)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval"):
        print("usage: python -m aiida_emlip.training.cli {train,eval} ...", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    return train_main(argv[1:]) if argv[0] == "train" else eval_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
