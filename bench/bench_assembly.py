"""Benchmark: the dataset's final assembly, in one calcfunction and in parts, side by side.

aiida-core compares each new input link of a process with the links made before it, and an earlier
``Dict`` input compares by content (``Dict.__eq__`` reads both nodes), so one ``assemble_dataset`` over N
configurations costs a time quadratic in N (less with the ``Dict`` inputs linked last, as
:func:`aiida_emlip.workflows.assembly.assemble` links them: then they meet only each other). ``assemble``
collects parts of at most ``ASSEMBLY_PART`` configurations and merges them. For each N this script stores
N configurations' labels the way pw.x leaves them (a structure, an ``output_parameters`` ``Dict`` with 40
entries and a trajectory with forces, made by a calcfunction so that each has a creator), then times the
assembly of the same labels with one part (the former way) and with parts, and checks that both datasets
are the same byte for byte. Target: linear in N (the time per configuration in parts does not grow with
N).

A throw-away SQLite profile (no broker) in a temporary folder, deleted at the end.

Usage: ``python bench/bench_assembly.py [--n 50 100 200] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import services_profile

WORK, PROFILE = services_profile.scratch_environment("emlip-bench-assembly")


def make_profile() -> None:
    from aiida import load_profile
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    create_profile(
        config,
        storage_backend="core.sqlite_dos",
        storage_config={"filepath": str(WORK / "storage")},
        name=PROFILE,
        email="bench@localhost",
    )
    config.set_default_profile(PROFILE, overwrite=True)
    config.store()
    load_profile(PROFILE, allow_switch=True)


def labels(n: int) -> tuple[dict, dict]:
    """The labels of ``n`` water molecules and the assembly's settings."""
    import numpy as np
    from aiida import orm
    from aiida.engine import calcfunction
    from ase.build import molecule

    @calcfunction
    def fake_pw(structure, index):  # no annotations: the calcfunction resolves them at run time
        trajectory = orm.TrajectoryData(structurelist=[structure.clone()])
        trajectory.set_array("forces", np.full((1, 3, 3), 0.01 * index.value))
        values = {f"k{j}": float(index.value * j) for j in range(39)}
        return {"parameters": orm.Dict({"energy": -400.0 - index.value, **values}), "trajectory": trajectory}

    out, configurations = {}, {}
    for i in range(n):
        key = f"c{i:04d}"
        configurations[key] = {"periodic_bulk": False, "total_charge": 0.0}
        atoms = molecule("H2O")
        atoms.positions += 0.001 * i
        atoms.center(vacuum=3.0)
        atoms.pbc = True
        structure = orm.StructureData(ase=atoms).store()
        out[key] = {"structure": structure, **fake_pw(structure, orm.Int(i))}
    settings = {
        "dft_settings": {"ecutwfc": 25.0},
        "configurations": configurations,
        "order": list(configurations),
        "failures": {},
        "postprocess_failures": {},
        "postprocess_skipped": {},
    }
    return out, settings


def measure(n: int) -> dict[str, float]:
    from aiida_emlip.workflows.assembly import ASSEMBLY_PART, assemble

    nodes, settings = labels(n)
    start = time.perf_counter()
    whole = assemble(settings, nodes, part=max(n, 1))
    one = time.perf_counter() - start
    start = time.perf_counter()
    parts = assemble(settings, nodes)
    split = time.perf_counter() - start
    assert parts["dataset"].get_text() == whole["dataset"].get_text(), "the two datasets differ"
    return {"n": n, "one_s": one, "parts_s": split, "part": ASSEMBLY_PART, "ratio": split / one}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[50, 100, 200], help="configurations")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    make_profile()
    rows = []
    try:
        head = ("N", "one calcfunction, s", "in parts, s", "parts / one", "ms per config")
        print("{:>5} {:>20} {:>12} {:>12} {:>14}".format(*head))
        for n in args.n:
            row = measure(n)
            rows.append(row)
            per = 1000 * row["parts_s"] / n
            print(
                f"{n:5d} {row['one_s']:20.1f} {row['parts_s']:12.1f} {row['ratio']:12.2f} {per:14.0f}",
                flush=True,
            )
        first, last = rows[0], rows[-1]
        growth = (last["parts_s"] / last["n"]) / (first["parts_s"] / first["n"])
        verdict = "met" if growth <= 1.25 else "missed"
        print(
            f"time per configuration in parts, N={last['n']} / N={first['n']}: {growth:.2f} "
            f"(linear: about 1, goal <= 1.25) -> {verdict}"
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
