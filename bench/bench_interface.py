"""Benchmark of the interface workchain (``emlip.validate.interface``) at a protocol (default ``fast``).

In a throw-away isolated profile (a temporary ``AIIDA_PATH``; ``aiida-emlip setup`` first): one run of
``EmlipInterfaceWorkChain`` with pp.x and three untrained models (``charges``, ``qeq``, ``scf``, the
demo backbone), so that model evaluation needs no training. Reports the wall time split into DFT (the
dataset workchain: pw.x, pp.x, labels), model evaluation (every ``emlip.evaluate`` calculation, summed:
they run alongside the DFT) and post-processing (the analysis and figure calcfunctions), from the
process nodes' creation and last-change times. The nodes' spans include the engine's scheduler polling
and the competition with pw.x for the cores, so each model's ``emlip-eval`` is also timed as a plain
process on the same states after the workchain (imports, model load and evaluation: what the
evaluation costs on its own).

Target: model evaluation below 5 % of the DFT wall time at the ``fast`` protocol.

Usage: ``python bench/bench_interface.py [--protocol fast] [--json out.json] [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from process_times import called_by_label, span

WORK = Path(tempfile.mkdtemp(prefix="emlip-bench-interface-"))
os.environ["AIIDA_PATH"] = str(WORK / ".aiida")
HEADS = {
    "charges": {"name": "charges", "correction": "weighted"},
    "qeq": {"name": "qeq"},
    "scf": {"name": "scf"},
}


def phases(node) -> dict[str, float]:
    """Seconds per phase of a finished interface workchain."""
    called = called_by_label(node)
    evaluations = [n for label, n in called.items() if label.startswith("evaluate_")]
    inside = [n.outputs.summary.get_dict().get("timings", {}) for n in evaluations if "summary" in n.outputs]
    return {
        "model_load_and_compute_inside_emlip_eval": sum(t.get("total_s", 0.0) for t in inside),
        "total": span([node]),
        "dft": span([called.get("dft")]),
        "model_evaluation": sum(span([n]) for n in evaluations),
        "model_evaluation_span": span(evaluations),
        "postprocessing": span([called.get("analyse"), called.get("figures")]),
        "structures": span([called.get("structures")]),
    }


def untrained_models(directory: Path) -> dict:
    """One untrained model per head on the demo backbone (H, O, Al), stored as emlip.model nodes."""
    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig
    from aiida_emlip.workflows.demo import design_config

    models = {}
    for label, head in HEADS.items():
        config = design_config(head, epochs=1)["model"]
        model = EmlipModel(ModelConfig(elements=["H", "O", "Al"], **config))
        models[label] = EmlipModelData(save_model(model, directory / f"{label}.safetensors")).store()
    return models


def direct_evaluation(node, directory: Path) -> dict[str, float]:
    """Wall time (s) of ``emlip-eval`` per model on the workchain's states, run one after another."""
    import ase.io

    from aiida_emlip.structures.response import model_cell

    structures = directory / "states.xyz"
    frames = []
    for atoms in node.outputs.configurations.to_ase():
        copy = model_cell(atoms)  # open along the normal, as the workchain's evaluations see them
        copy.info = dict(atoms.info)
        frames.append(copy)
    ase.io.write(structures, frames, format="extxyz")
    times = {}
    for label in sorted(node.inputs.models):
        model = node.inputs.models[label].export(directory / f"{label}-eval.safetensors")
        start = time.perf_counter()
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("emlip-eval")),
                str(model),
                str(structures),
                "-o",
                str(directory / f"{label}.xyz"),
            ],
            capture_output=True,
            text=True,
        )
        times[label] = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"emlip-eval {label} failed:\n{proc.stderr[-2000:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="fast")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away profile")
    args = parser.parse_args()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aiida_emlip.cli", "setup"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"aiida-emlip setup failed:\n{proc.stdout}\n{proc.stderr}")
    setup_s = time.perf_counter() - start
    try:
        from aiida import load_profile, orm
        from aiida.engine import run_get_node

        load_profile()
        from aiida_emlip.workflows.validate.interface import EmlipInterfaceWorkChain

        codes = {c.label: c for c in orm.QueryBuilder().append(orm.AbstractCode).all(flat=True)}
        family = (
            orm.QueryBuilder().append(orm.Group, filters={"label": {"like": "emlip-ld1%"}}).first(flat=True)
        )
        builder = EmlipInterfaceWorkChain.get_builder_from_protocol(
            codes["pw"],
            family.label,
            protocol=args.protocol,
            pp_code=codes["pp"],
            models=untrained_models(WORK),
            eval_code=codes["emlip-eval"],
        )
        _, node = run_get_node(builder)
        if not node.is_finished_ok:
            sys.exit(f"interface workchain failed: {node.exit_status} {node.exit_message}")
        times = phases(node)
        direct = direct_evaluation(node, WORK)
        ratio = sum(direct.values()) / times["dft"]
        result = {
            "protocol": args.protocol,
            "setup_s": round(setup_s, 1),
            **{f"{k}_s": round(v, 1) for k, v in times.items()},
            "emlip_eval_process_s": {k: round(v, 1) for k, v in direct.items()},
            "node_span_ratio": round(times["model_evaluation"] / times["dft"], 4),
            "model_evaluation_over_dft": round(ratio, 4),
            "target": "model evaluation < 0.05 of DFT",
            "met": ratio < 0.05,
            "states": len(node.outputs.setup.get_dict()),
            "models": sorted(HEADS),
        }
        print(json.dumps(result, indent=2))
        print(node.outputs.verdicts["text"])
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
