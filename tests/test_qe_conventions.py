"""Conventions pinned against real pw.x (decision 6), through the dataset workchain's own code path.

* external field: E in V/Å is the physical field, the force on a charge q is qE (eamp in Hartree a.u.);
* charged cells: ``tot_charge`` has a uniform background: Li⁺ energy shifts by the Madelung −αq²k_e/(2L);
* dipole sign: the stored dipole points from − to + (water: from O towards the hydrogens);
* stress sign: ASE's, stress = (1/V) ∂E/∂ε, negative for a compressed cell;
* slab dipole correction: see ``test_dataset_workchain.py::test_slab_dipole_correction``.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule
from dataset_systems import CHEAP, in_box

from aiida_emlip import schema

pytestmark = pytest.mark.pw

FIELD = 0.5  # V/Å
MADELUNG_SC = 2.837297
A_COMPRESSED = 3.9
STRAIN = 0.005
#: Li is ultrasoft (dual 8).
OVERRIDES = {**CHEAP, "ecutrho": 200.0}


def _water_layer(up: bool):
    water = molecule("H2O")  # hydrogens below the oxygen (−z)
    if up:
        water.positions[:, 2] *= -1
    water.cell = [3.0, 3.2, 12.0]
    water.center()
    water.pbc = True
    return water


def _al(scale: float):
    return bulk("Al", "fcc", a=A_COMPRESSED * scale)


SYSTEMS = {
    "nacl_plus_x": (lambda: _nacl(), {"external_field": [FIELD, 0, 0]}),
    "nacl_minus_x": (lambda: _nacl(), {"external_field": [-FIELD, 0, 0]}),
    "water_up": (lambda: _water_layer(True), {}),
    "water_down": (lambda: _water_layer(False), {}),
    "al": (lambda: _al(1.0), {}),
    "al_plus": (lambda: _al(1.0 + STRAIN), {}),
    "al_minus": (lambda: _al(1.0 - STRAIN), {}),
    "li_6": (lambda: _li(6.0), {"total_charge": 1}),
    "li_8": (lambda: _li(8.0), {"total_charge": 1}),
}


def _li(box: float):
    from ase import Atoms

    return in_box(Atoms("Li"), box)


def _nacl():
    from ase import Atoms

    dimer = Atoms("NaCl", positions=[[0, 0, 0], [2.36, 0, 0]], cell=[9.0, 7.0, 7.0], pbc=True)
    dimer.center()
    return dimer


@pytest.fixture(scope="module")
def frames(pw_code, pseudo_family):
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    structures = {key: orm.StructureData(ase=factory()) for key, (factory, _) in SYSTEMS.items()}
    settings = {key: s for key, (_, s) in SYSTEMS.items() if s}
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code,
        structures,
        pseudo_family.label,
        protocol="fast",
        overrides=CHEAP,
        structure_settings=settings,
    )
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_message
    assert results["report"]["n_failed"] == 0, results["report"]["failed"]
    return {atoms.info["key"]: atoms for atoms in results["dataset"].to_ase()}


def test_external_field_sign_and_units(frames):
    """NaCl dimer (Na at −x, Cl at +x) in fields ±E along x, E in V/Å.

    Units: pw.x prints the amplitude it applied in Hartree a.u.; it must be E/51.422. Sign: a field
    along +x moves electrons to −x, so the dipole (pointing from Cl⁻ to Na⁺, i.e. along −x) shrinks,
    and the force on Na⁺ grows along +x. pw.x removes the net force, so a single ion would show none.
    """
    from aiida import orm

    plus, minus = frames["nacl_plus_x"], frames["nacl_minus_x"]
    assert np.allclose(plus.info[schema.EXTERNAL_FIELD], [FIELD, 0, 0])
    stdout = orm.load_node(plus.info["source_uuid"]).outputs.retrieved.base.repository.get_object_content(
        "aiida.out"
    )
    amplitude = float(stdout.split("E field amplitude [Ha a.u.]:")[1].split()[0])
    assert amplitude == pytest.approx(FIELD / schema.FIELD_AU_IN_V_PER_A, rel=1e-3)
    assert plus.info[schema.DIPOLE][0] < 0 and minus.info[schema.DIPOLE][0] < 0
    assert plus.info[schema.DIPOLE][0] - minus.info[schema.DIPOLE][0] > 0.1  # e·Å, polarisable along E
    delta = plus.arrays[schema.FORCES] - minus.arrays[schema.FORCES]
    born = delta[0, 0] / (2 * FIELD)
    assert 0.2 < born < 1.5, f"Born charge of Na from the field response: {born:.3f}"
    assert delta[1, 0] == pytest.approx(-delta[0, 0], abs=1e-3)
    assert np.abs(delta[:, 1:]).max() < 0.01


def test_charged_cell_background(frames):
    """Li⁺ (compact 1s² core) with a uniform background: E(6 Å) − E(8 Å) = −αk_e/2 (1/6 − 1/8)."""
    expected = -MADELUNG_SC * schema.COULOMB_CONSTANT / 2 * (1 / 6.0 - 1 / 8.0)
    delta = frames["li_6"].info[schema.ENERGY] - frames["li_8"].info[schema.ENERGY]
    assert delta == pytest.approx(expected, abs=0.15)
    assert frames["li_6"].info[schema.TOTAL_CHARGE] == 1.0


def test_dipole_sign(frames):
    """A water layer with the hydrogens up has its dipole along +z (from O towards H)."""
    up = frames["water_up"].info[schema.DIPOLE]
    down = frames["water_down"].info[schema.DIPOLE]
    assert up[2] > 0.1 and down[2] < -0.1
    assert up[2] == pytest.approx(-down[2], rel=0.05)
    assert up[0] == 0.0 and up[1] == 0.0


def test_stress_sign(frames):
    """Compressed Al: negative ASE stress, equal to (1/V) dE/dε from finite differences."""
    stress = frames["al"].info[schema.STRESS]
    assert np.allclose(stress, stress.T, atol=1e-6)
    assert np.all(np.diag(stress) < 0)
    volume = frames["al"].get_volume()
    d_energy = frames["al_plus"].info[schema.ENERGY] - frames["al_minus"].info[schema.ENERGY]
    # isotropic strain ε on all axes: dE/dε = V tr(σ)
    fd_trace = d_energy / (2 * STRAIN) / volume
    assert np.trace(stress) == pytest.approx(fd_trace, rel=0.1)
