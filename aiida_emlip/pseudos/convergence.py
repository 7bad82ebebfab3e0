"""Measure the recommended cutoffs of the family with ``pw.x`` (writes ``cutoffs.yaml``).

Criterion: the smallest tested ``ecutwfc`` at which the total energy per atom of the element's test
system lies within ``tolerance`` (default 1 mRy/atom) of its value at ``reference`` Ry, and stays
there for every larger cutoff tested. ``ecutrho`` is 4 × ``ecutwfc`` for norm-conserving and 8 ×
for ultrasoft potentials. Run ``python -m aiida_emlip.pseudos.convergence OUTDIR [El ...]`` to redo it
(norm-conserving: 30–120 Ry in 10 Ry steps against 160 Ry; ultrasoft: add ``--us`` for 30–60 Ry in
5 Ry steps against 120 Ry, as recorded in ``cutoffs.yaml``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ase import Atoms
from ase.build import bulk

from .generate import ELEMENTS, generate_family
from .pwtools import run_pw

__all__ = ("DUAL", "TEST_SYSTEMS", "converge_cutoff", "dual")


def _h2() -> Atoms:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.75]], cell=[6.0, 6.2, 6.4])
    atoms.center()
    return atoms


#: element -> (structure factory, k-mesh or None for Γ, Marzari–Vanderbilt smearing in Ry or None)
TEST_SYSTEMS: dict[str, tuple[Callable[[], Atoms], tuple[int, int, int] | None, float | None]] = {
    "H": (_h2, None, None),
    "Li": (lambda: bulk("Li", "bcc", a=3.44), (6, 6, 6), 0.02),
    "C": (lambda: bulk("C", "diamond", a=3.57), (4, 4, 4), None),
    "O": (lambda: bulk("MgO", "rocksalt", a=4.26), (4, 4, 4), None),
    "F": (lambda: bulk("NaF", "rocksalt", a=4.63), (4, 4, 4), None),
    "Na": (lambda: bulk("Na", "bcc", a=4.20), (6, 6, 6), 0.02),
    "Mg": (lambda: bulk("Mg", "fcc", a=4.52), (6, 6, 6), 0.02),
    "Al": (lambda: bulk("Al", "fcc", a=4.04), (6, 6, 6), 0.02),
    "Si": (lambda: bulk("Si", "diamond", a=5.47), (4, 4, 4), None),
    "Cl": (lambda: bulk("NaCl", "rocksalt", a=5.70), (4, 4, 4), None),
    "Cu": (lambda: bulk("Cu", "fcc", a=3.63), (6, 6, 6), 0.02),
}

#: ecutrho / ecutwfc by pseudopotential type
DUAL = {"NC": 4.0, "US": 8.0, "PAW": 8.0}


def dual(upf: Path) -> float:
    """Return the ecutrho/ecutwfc ratio for the UPF file (4 for NC, 8 for US/PAW)."""
    text = Path(upf).read_text(errors="replace")
    if 'is_paw="true"' in text or 'is_paw="T"' in text:
        return DUAL["PAW"]
    if 'is_ultrasoft="true"' in text or 'is_ultrasoft="T"' in text:
        return DUAL["US"]
    return DUAL["NC"]


def converge_cutoff(
    element: str,
    pseudos: dict[str, Path],
    ecuts: Sequence[float] = (30, 40, 50, 60, 70, 80, 90, 100, 110, 120),
    reference: float = 160.0,
    tolerance: float = 1e-3,
) -> tuple[float, float, list[tuple[float, float]]]:
    """Return ``(ecutwfc, ecutrho, [(ecut, dE in Ry/atom), ...])`` for ``element`` (module criterion)."""
    factory, kpts, smearing = TEST_SYSTEMS[element]
    atoms = factory()
    ratio = max(dual(pseudos[s]) for s in set(atoms.get_chemical_symbols()))

    def energy(ecut: float) -> float:
        return run_pw(atoms, pseudos, ecut, ratio * ecut, kpts, smearing).energy_ry / len(atoms)

    e_ref = energy(reference)
    table = [(float(e), energy(e) - e_ref) for e in ecuts]
    chosen = reference
    for i, (ecut, _) in enumerate(table):
        if all(abs(d) < tolerance for _, d in table[i:]):
            chosen = ecut
            break
    return chosen, ratio * chosen, table


US_SCAN = {"ecuts": (30, 35, 40, 45, 50, 60), "reference": 120.0}


def main(outdir: str, elements: Iterable[str] | None = None, ultrasoft_scan: bool = False) -> None:
    """Measure and print the cutoffs of ``elements`` as YAML (generating the UPFs into ``outdir``)."""
    pseudos = generate_family(Path(outdir))
    for element in elements or ELEMENTS:
        scan = US_SCAN if ultrasoft_scan else {}
        wfc, rho, table = converge_cutoff(element, pseudos, **scan)
        rows = ", ".join(f"{e:.0f}: {1000 * d:+.2f}" for e, d in table)
        print(
            f"  {element}: {{ecutwfc: {wfc:.0f}, ecutrho: {rho:.0f}}}  # dE mRy/atom {{{rows}}}", flush=True
        )


if __name__ == "__main__":
    args = [a for a in sys.argv[2:] if a != "--us"]
    main(sys.argv[1], args or None, ultrasoft_scan="--us" in sys.argv)
