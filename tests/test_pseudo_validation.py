"""Validate the ld1.x family with real pw.x against PBE reference geometries.

Lattice constants come from a Birch–Murnaghan fit of five E(V) points (a_ref ± 3 %); the O–H bond
from a BFGS relaxation of H2O in a box. Every value must lie within 2 % of the PBE reference.
Run with ``pytest -m slow tests/test_pseudo_validation.py``; measured values are in docs/pseudos.md.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from ase import Atoms
from ase.build import bulk, molecule

from aiida_emlip.pseudos.generate import generate_family, recommended_cutoffs
from aiida_emlip.pseudos.pwtools import lattice_constant, run_pw

pytestmark = [
    pytest.mark.slow,
    pytest.mark.pw,
    pytest.mark.skipif(
        shutil.which("pw.x") is None or shutil.which("ld1.x") is None,
        reason="pw.x / ld1.x (Debian quantum-espresso) missing",
    ),
]

TOLERANCE = 0.02

#: name -> (builder a -> Atoms, PBE a0 in Å, k-mesh, MV smearing in Ry or None for insulators)
CRYSTALS: dict[str, tuple[Callable[[float], Atoms], float, tuple[int, int, int], float | None]] = {
    "NaCl": (lambda a: bulk("NaCl", "rocksalt", a=a), 5.70, (4, 4, 4), None),
    "LiF": (lambda a: bulk("LiF", "rocksalt", a=a), 4.07, (4, 4, 4), None),
    "MgO": (lambda a: bulk("MgO", "rocksalt", a=a), 4.26, (4, 4, 4), None),
    "Al": (lambda a: bulk("Al", "fcc", a=a), 4.04, (8, 8, 8), 0.02),
    "Si": (lambda a: bulk("Si", "diamond", a=a), 5.47, (4, 4, 4), None),
    "C": (lambda a: bulk("C", "diamond", a=a), 3.57, (4, 4, 4), None),
    "Cu": (lambda a: bulk("Cu", "fcc", a=a), 3.63, (8, 8, 8), 0.02),
}


@pytest.fixture(scope="module")
def pseudos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_family(tmp_path_factory.mktemp("emlip_family"))


def _cutoffs(atoms: Atoms) -> tuple[float, float]:
    pairs = [recommended_cutoffs(s) for s in set(atoms.get_chemical_symbols())]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_lattice_constant(name: str, pseudos: dict[str, Path]) -> None:
    build, reference, kpts, smearing = CRYSTALS[name]
    wfc, rho = _cutoffs(build(reference))
    a0, points = lattice_constant(
        build, reference, lambda atoms: run_pw(atoms, pseudos, wfc, rho, kpts, smearing)
    )
    deviation = a0 / reference - 1
    print(f"{name}: a0 = {a0:.4f} Å (PBE {reference}), {100 * deviation:+.2f} % at {wfc:.0f}/{rho:.0f} Ry")
    # the sampled energies bracket a minimum
    energies = [e for _, e in points]
    assert min(energies) < energies[0] and min(energies) < energies[-1]
    assert abs(deviation) < TOLERANCE


def test_water_oh_bond(pseudos: dict[str, Path]) -> None:
    atoms = molecule("H2O")
    atoms.set_cell([8.0, 8.2, 8.4])
    atoms.center()
    atoms.positions[1] += [0.0, 0.05, 0.03]  # start away from the equilibrium geometry
    wfc, rho = _cutoffs(atoms)
    result = run_pw(atoms, pseudos, wfc, rho, calculation="relax", extra={"forc_conv_thr": 5e-4})
    bonds = [result.atoms.get_distance(0, 1), result.atoms.get_distance(0, 2)]
    angle = result.atoms.get_angle(1, 0, 2)
    print(f"H2O: O-H = {bonds[0]:.4f}, {bonds[1]:.4f} Å (PBE 0.97), angle {angle:.1f}°")
    assert len(result.energies_ry) > 1  # it really relaxed
    for bond in bonds:
        assert abs(bond / 0.97 - 1) < TOLERANCE
    assert 100.0 < angle < 108.0  # PBE 104.2°


def test_methane_ch_bond(pseudos: dict[str, Path]) -> None:
    atoms = molecule("CH4")
    atoms.set_cell([7.0, 7.2, 7.4])
    atoms.center()
    atoms.positions[1:] = atoms.positions[0] + 1.04 * (atoms.positions[1:] - atoms.positions[0])
    wfc, rho = _cutoffs(atoms)
    result = run_pw(atoms, pseudos, wfc, rho, calculation="relax", extra={"forc_conv_thr": 5e-4})
    bonds = [result.atoms.get_distance(0, i) for i in range(1, 5)]
    print(f"CH4: C-H = {sum(bonds) / 4:.4f} Å (PBE 1.096)")
    for bond in bonds:
        assert abs(bond / 1.096 - 1) < TOLERANCE
