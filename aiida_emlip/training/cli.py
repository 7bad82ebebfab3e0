"""``emlip-train`` and ``emlip-eval``: the trainer and the evaluator as plain command-line tools.

Exit statuses (see :class:`~aiida_emlip.training.errors.ExitCode`): 0 ok, 1 internal error,
2 bad configuration or data (before any compute), 3 NaN/inf, 4 interrupted by a signal with a
checkpoint written.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from aiida_emlip.training.errors import ExitCode, TrainingError

EXIT_HELP = """exit status:
  0  success
  1  internal error (a bug; traceback printed)
  2  bad configuration or dataset (unknown key, missing label, wrong units, empty file), before any compute
  3  NaN or inf in the data, the loss or the gradients: stopped cleanly
  4  interrupted by SIGTERM/SIGUSR1/SIGINT: checkpoint written, continue with --resume CHECKPOINT
  5  a self-consistent head did not converge or diverged (head option on_failure: raise)
"""


def _guard(body: Callable[[], None]) -> int:
    try:
        body()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception:
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
            "train.log. Several GPUs or nodes: launch the same command with torchrun, e.g.\n"
            "  torchrun --nproc_per_node 4 -m aiida_emlip.training.cli train CONFIG.yaml"
        ),
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="YAML configuration file (see examples/*.yaml)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's device")
    parser.add_argument("--output-dir", type=Path, help="overrides the config's output_dir")
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue bit-for-bit from a checkpoint; 'auto' uses OUTPUT_DIR/checkpoint.pt when it exists",
    )
    parser.add_argument("--check", action="store_true", help="validate the config and data, then exit")
    return parser


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emlip-train``."""
    args = train_parser().parse_args(argv)

    def body() -> None:
        import signal

        from aiida_emlip.training.config import load_config
        from aiida_emlip.training.trainer import Trainer

        config = load_config(args.config)
        trainer = Trainer(config, output_dir=args.output_dir, device=args.device)
        if args.check:
            print(
                f"ok: {len(trainer.train)} train, {len(trainer.valid)} valid, "
                f"{len(trainer.test)} test structures"
            )
            return
        resume = args.resume
        if resume == "auto":
            resume = trainer.checkpoint_path if trainer.checkpoint_path.is_file() else None
        # SIGINT (Ctrl-C) also checkpoints cleanly
        signal.signal(signal.SIGINT, lambda s, f: trainer._on_signal(s, f))
        trainer.run(resume=resume)

    return _guard(body)


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emlip-eval",
        description=(
            "Evaluate a trained model (MODEL.safetensors) on DATA.xyz. Writes the structures with\n"
            "predictions (PREFIX_energy, PREFIX_forces, PREFIX_stress, PREFIX_charges, PREFIX_dipoles,\n"
            "PREFIX_dipole, PREFIX_fermi_level) as extxyz and, where DATA.xyz has labels, prints an\n"
            "error table by quantity, config type and total charge. Self-consistent heads converge\n"
            "from the local guess. Example:\n"
            "  emlip-eval runs/charges/model.safetensors test.xyz -o pred.xyz --errors errors.json"
        ),
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="model file written by emlip-train (.safetensors)")
    parser.add_argument("data", type=Path, help="extxyz file of structures (labels optional)")
    parser.add_argument(
        "-o", "--output", type=Path, help="predictions extxyz (default: DATA stem + _pred.xyz)"
    )
    parser.add_argument("--errors", type=Path, help="also write the error table as JSON here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prefix", default="emlip", help="prefix of the prediction keys (default: emlip)")
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="SCHEMA=FILE",
        help="label key mapping, e.g. --key energy=REF_energy (repeatable)",
    )
    return parser


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emlip-eval``."""
    args = eval_parser().parse_args(argv)

    def body() -> None:
        from aiida_emlip.training.evaluate import evaluate_file

        keys = {}
        for item in args.key:
            if "=" not in item:
                from aiida_emlip.training.errors import ConfigError

                raise ConfigError(f"--key expects SCHEMA=FILE, got {item!r}")
            schema_key, file_key = item.split("=", 1)
            keys[schema_key] = file_key
        output = args.output or args.data.with_name(args.data.stem + "_pred.xyz")
        table = evaluate_file(
            args.model,
            args.data,
            output,
            device=args.device,
            batch_size=args.batch_size,
            prefix=args.prefix,
            keys=keys,
            errors_json=args.errors,
        )
        print(f"wrote {output}")
        print(table)

    return _guard(body)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aiida_emlip.training.cli train|eval ...`` (what torchrun launches)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval"):
        print("usage: python -m aiida_emlip.training.cli {train,eval} ...", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    return train_main(argv[1:]) if argv[0] == "train" else eval_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
