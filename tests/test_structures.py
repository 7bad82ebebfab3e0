"""Samplers: shapes, seeds, charge states, geometry (no AiiDA, no pw.x)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from aiida_emlip import structures as st
from aiida_emlip.structures.geometry import cell_volume


def test_rattle_is_seeded_and_records_seed():
    al = bulk("Al", "fcc", a=4.05, cubic=True)
    a = st.rattle(al, 3, stdev=0.05, seed=7)
    b = st.rattle(al, 3, stdev=0.05, seed=7)
    c = st.rattle(al, 3, stdev=0.05, seed=8)
    assert len(a) == 3
    assert np.allclose(a[2].positions, b[2].positions)
    assert not np.allclose(a[2].positions, c[2].positions)
    assert a[0].info["seed"] == 7 and a[0].info["sampler"] == "rattle"
    assert json.loads(a[1].info["sampler_params"])["index"] == 1
    displacement = np.linalg.norm(a[0].positions - al.positions, axis=1)
    assert 0.01 < displacement.mean() < 0.2


def test_strain_changes_volume_within_bounds():
    si = bulk("Si", "diamond", a=5.47)
    frames = st.strain(si, 5, max_strain=0.03, seed=1)
    ratios = [cell_volume(f) / cell_volume(si) for f in frames]
    assert all(0.9 < r < 1.1 for r in ratios) and np.std(ratios) > 1e-3
    # scaled positions are kept
    assert np.allclose(frames[0].get_scaled_positions(), si.get_scaled_positions())


def test_quartz_oxygen_vacancy_charge_states():
    quartz = st.alpha_quartz()
    assert quartz.get_chemical_formula() == "O6Si3"
    assert st.min_interatomic_distance(quartz) == pytest.approx(1.60, abs=0.03)
    frames = st.quartz_oxygen_vacancy(charges=(0, 1, 2), supercell=(2, 2, 1))
    assert [f.info["total_charge"] for f in frames] == [0.0, 1.0, 2.0]
    assert all(f.get_chemical_formula() == "O23Si12" for f in frames)
    assert frames[2].info["config_type"] == "V_O+2"


def test_metal_water_interface_density_and_vacuum():
    frame = st.metal_water_interface("Al", "111", size=(2, 2, 3), water_thickness=6.0, vacuum=10.0, seed=3)
    symbols = frame.get_chemical_symbols()
    n_water = symbols.count("O")
    area = np.linalg.norm(np.cross(frame.cell[0], frame.cell[1]))
    assert n_water == round(0.0334 * area * 6.0)
    assert symbols.count("H") == 2 * n_water and symbols.count("Al") == 12
    assert st.slab_axis(frame) == 2
    assert st.min_interatomic_distance(frame) > 0.9
    again = st.metal_water_interface("Al", "111", size=(2, 2, 3), water_thickness=6.0, vacuum=10.0, seed=3)
    assert np.allclose(frame.positions, again.positions)
    ions = st.metal_water_interface(
        "Al", "100", size=(2, 2, 2), n_water=2, ions=["Na"], total_charge=1, seed=1
    )
    assert ions.get_chemical_symbols().count("Na") == 1 and ions.info["total_charge"] == 1.0


def test_ion_slab_scan_heights():
    slab = st.fcc_slab("Al", "111", size=(2, 2, 2))
    top = slab.positions[:, 2].max()
    frames = st.ion_slab_scan(slab, "Na", [2.0, 3.0, 5.0], total_charge=1.0)
    heights = [f.positions[-1, 2] - top for f in frames]
    assert heights == pytest.approx([2.0, 3.0, 5.0])
    assert all(f.info["total_charge"] == 1.0 for f in frames)
    assert all(st.slab_axis(f) == 2 for f in frames)


def test_md_snapshots_seeded():
    al = bulk("Al", "fcc", a=4.05, cubic=True)
    a = st.md_snapshots(al, EMT(), 2, interval=3, seed=5)
    b = st.md_snapshots(al, EMT, 2, interval=3, seed=5)
    assert np.allclose(a[1].positions, b[1].positions)
    assert a[0].info["seed"] == 5 and a[0].calc is None


def test_geometry_helpers():
    box = bulk("Al", "fcc", a=4.05, cubic=True)
    assert st.vacuum_axes(box) == []
    box.center(vacuum=4.0, axis=2)
    assert st.slab_axis(box) == 2
    box.center(vacuum=4.0)
    assert st.vacuum_axes(box) == [0, 1, 2] and st.slab_axis(box) is None
