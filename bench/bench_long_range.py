"""Long-range benchmark: do the electrostatic designs beat ``sr`` beyond the cutoff on held-out data?

Three systems in periodic cells (:func:`aiida_emlip.structures.fragments.long_range_set`): Li⁺ and F⁻
approaching a water molecule (total charge ±1, so the cell is charged) and a neutral water pair, at
closest-atom separations from bonding to 9 Å, far beyond the 4 Å cutoff of the backbone.

1. ``label``: pw.x energies, forces and Hirshfeld charges through :class:`EmlipDatasetWorkChain` in the
   project profile (``aiida-emlip setup`` first); the dataset is exported to ``bench/data``.
2. ``train``: every design (the named presets, same backbone, epochs and seed) on the same random 80 %
   (a tenth of it for validation); each run lands in ``--workdir/<design>``.
3. ``report``: on the held-out 20 %: energy RMSE of configurations beyond the cutoff as a ratio to
   ``sr``, the same on neutral configurations, and the error of the charge each design puts on each
   fragment (against the DFT Hirshfeld sum). Goals: best design ≤ 1/3 of ``sr``'s far error, ``scf``
   ≤ 1/2, every supervised charge-bearing design within 0.1 e on the ion's fragment, none worse than
   ``sr`` on neutral configurations by more than 10 %.

Usage: ``python bench/bench_long_range.py all [--epochs 150] [--quick]`` (or one stage at a time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "long_range.xyz"
DFT = {
    "ecutwfc": 25.0,
    "ecutrho": 200.0,
    "kpoints_distance": 10.0,
    "conv_thr_per_atom": 1.0e-9,
    "max_iterations": 2,
    "postprocess": {"hirshfeld": True},
}


def label(out: Path, quick: bool) -> None:
    """Run the dataset workchain on the long-range set and export it."""
    from aiida_emlip.profile import load_or_create_profile, select_profile

    load_or_create_profile(select_profile(None), create=False)
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.pseudos.family import FAMILY_LABEL
    from aiida_emlip.structures.fragments import long_range_set
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    frames = long_range_set(n_separations=4, orientations=1) if quick else long_range_set()
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        orm.load_code("pw@localhost"),
        EmlipDatasetData(frames=frames),
        FAMILY_LABEL,
        protocol="fast",
        overrides=DFT,
        max_concurrent=2,
    )
    builder.pp_code = orm.load_code("pp@localhost")
    start = time.perf_counter()
    results, node = run_get_node(builder)
    print(f"{node.process_label}<{node.pk}>: exit {node.exit_status} in {time.perf_counter() - start:.0f} s")
    if "dataset" not in results:
        sys.exit(f"labelling failed: {results['report'].get_dict()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    results["dataset"].export(out)
    print(f"{len(results['dataset'])} configurations -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["label", "train", "report", "all"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--quick", action="store_true", help="a few configurations only (a smoke test)")
    args = parser.parse_args(argv)
    if args.stage in ("label", "all"):
        label(args.data, args.quick)


if __name__ == "__main__":
    main()
