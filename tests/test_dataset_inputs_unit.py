"""pw.x input construction and protocol merging without running pw.x."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from dataset_systems import al_slab_water, in_box

from aiida_emlip import schema
from aiida_emlip.workflows.protocol import (
    OverrideError,
    ProtocolError,
    check_protocol_inputs,
    get_protocol_inputs,
    protocol_names,
)
from aiida_emlip.workflows.pw_inputs import ConfigurationError, build_pw_setup, kpoints_mesh
from aiida_emlip.workflows.vacuum_level import planar_average, vacuum_levels

Z = {"H": 1.0, "O": 6.0, "Al": 3.0, "Na": 1.0, "Cl": 7.0}
CUT = (30.0, 120.0)


def _setup(atoms, settings=None, **overrides):
    return build_pw_setup(atoms, settings or {}, get_protocol_inputs("fast", overrides), Z, CUT)


def test_protocols_and_aliases():
    assert {"fast", "balanced", "stringent", "moderate", "precise"} == set(protocol_names())
    assert get_protocol_inputs("moderate")["protocol"] == "balanced"
    assert get_protocol_inputs()["protocol"] == "balanced"
    fast, precise = get_protocol_inputs("fast"), get_protocol_inputs("precise")
    assert fast["kpoints_distance"] > precise["kpoints_distance"]
    assert fast["conv_thr_per_atom"] > precise["conv_thr_per_atom"]
    with pytest.raises(ProtocolError):
        get_protocol_inputs("ultra")
    with pytest.raises(OverrideError, match=r"postprocess\.lowdn"):
        get_protocol_inputs("fast", {"postprocess": {"lowdn": True}})
    merged = get_protocol_inputs(
        "fast", {"parameters": {"SYSTEM": {"nbnd": 8}}, "options": {"queue_name": "q"}}
    )
    assert merged["parameters"] == {"SYSTEM": {"nbnd": 8}} and merged["options"]["queue_name"] == "q"


def test_complete_protocol_inputs_are_used_as_they_are():
    """Merged inputs given back are checked, never merged again: complete, known keys, the same protocol,
    every override held."""
    overrides = {"ecutwfc": 30.0, "postprocess": {"lowdin": True}, "parameters": {"SYSTEM": {"nbnd": 8}}}
    merged = get_protocol_inputs("precise", overrides)
    assert check_protocol_inputs(merged, "stringent", overrides) == merged
    assert check_protocol_inputs(merged, "precise") == merged  # aliases resolve
    edited = {**merged, "degauss": 0.02, "options": {"resources": {"num_machines": 2}}}
    assert check_protocol_inputs(edited, "stringent", overrides) == edited  # nothing merged back in
    without_name = {k: v for k, v in merged.items() if k != "protocol"}
    assert check_protocol_inputs(without_name, "stringent")["protocol"] == "stringent"
    # inputs resolved before k-point pools existed mean no pools; they are not refused
    older = {k: v for k, v in merged.items() if k != "parallelization"}
    assert check_protocol_inputs(older, "stringent", overrides) == {**merged, "parallelization": {}}
    with pytest.raises(
        OverrideError, match=r"lack mixing_beta, postprocess\.vacuum_level, .*hirshfeld: give"
    ):
        incomplete = {k: v for k, v in merged.items() if k != "mixing_beta"}
        check_protocol_inputs({**incomplete, "postprocess": {"lowdin": True}}, "stringent")
    with pytest.raises(OverrideError, match="unknown override key 'ecut'"):
        check_protocol_inputs({**merged, "ecut": 30}, "stringent")
    with pytest.raises(OverrideError, match="SYSTEMS"):
        check_protocol_inputs({**merged, "parameters": {"SYSTEMS": {}}}, "stringent")
    with pytest.raises(OverrideError, match="resolved for protocol 'stringent' but the protocol is 'fast'"):
        check_protocol_inputs(merged, "fast")
    with pytest.raises(ProtocolError):
        check_protocol_inputs(merged, "ultra")
    with pytest.raises(OverrideError, match=r"ecutwfc \(override 40\.0, protocol_inputs 30\.0\)"):
        check_protocol_inputs(merged, "stringent", {"ecutwfc": 40.0})
    with pytest.raises(OverrideError, match=r"parameters\.SYSTEM\.nbnd"):
        check_protocol_inputs(merged, "stringent", {"parameters": {"SYSTEM": {"nbnd": 9}}})
    with pytest.raises(OverrideError, match="unknown override key 'smear'"):
        check_protocol_inputs(merged, "stringent", {"smear": "gaussian"})


def test_molecule_neutral_charged_and_odd():
    water = in_box(molecule("H2O"))
    setup = _setup(water)
    system = setup.parameters["SYSTEM"]
    assert system["occupations"] == "fixed" and "tot_charge" not in system and "nspin" not in system
    assert setup.kpoints_mesh == [1, 1, 1] and not setup.periodic_bulk
    assert setup.parameters["CONTROL"]["tstress"] is False
    hydroxide = _setup(in_box(molecule("OH")), {"total_charge": -1})
    assert hydroxide.parameters["SYSTEM"]["tot_charge"] == -1.0 and hydroxide.n_electrons == 8
    radical = _setup(in_box(molecule("OH")))
    assert (
        radical.parameters["SYSTEM"]["nspin"] == 2
        and radical.parameters["SYSTEM"]["tot_magnetization"] == 1.0
    )
    triplet = _setup(in_box(molecule("O2")), {"total_spin": 2})
    assert triplet.parameters["SYSTEM"]["tot_magnetization"] == 2.0


def test_metal_bulk_and_slab():
    al = _setup(bulk("Al", "fcc", a=4.05, cubic=True))
    assert al.is_metal and al.periodic_bulk and al.parameters["CONTROL"]["tstress"] is True
    assert al.parameters["SYSTEM"]["occupations"] == "smearing" and al.parameters["SYSTEM"]["nbnd"] >= 13
    assert all(k > 1 for k in al.kpoints_mesh)
    slab = al_slab_water()
    setup = _setup(slab)
    control, system = setup.parameters["CONTROL"], setup.parameters["SYSTEM"]
    assert control["tefield"] and control["dipfield"] and system["edir"] == 3 and system["eamp"] == 0.0
    assert setup.kpoints_mesh[2] == 1
    # the sawtooth turns over inside the vacuum: no atom between emaxpos and emaxpos + eopreg
    frac = slab.get_scaled_positions()[:, 2]
    rel = (frac - system["emaxpos"]) % 1.0
    assert np.all(rel > system["eopreg"])
    off = _setup(slab, {"dipole_correction": False})
    assert "tefield" not in off.parameters["CONTROL"]


def test_field_conversion_and_axis():
    water = in_box(molecule("H2O"))
    setup = _setup(water, {"external_field": [0.0, 0.0, -0.2]})
    system = setup.parameters["SYSTEM"]
    assert system["edir"] == 3 and setup.parameters["CONTROL"]["dipfield"]
    assert system["eamp"] == pytest.approx(-0.2 / schema.FIELD_AU_IN_V_PER_A)
    with pytest.raises(ConfigurationError) as error:
        _setup(water, {"external_field": [0.1, 0.1, 0.0]})
    assert error.value.code == "ERROR_INVALID_FIELD"
    slab = _setup(al_slab_water(), {"external_field": [0.0, 0.0, 0.3]})
    assert slab.parameters["CONTROL"]["dipfield"] and slab.parameters["SYSTEM"]["eamp"] > 0


@pytest.mark.parametrize(
    ("atoms", "settings", "code"),
    [
        (in_box(Atoms("H")), {"total_charge": 1}, "ERROR_NO_ELECTRONS"),
        (in_box(Atoms("Ar")), {}, "ERROR_ELEMENT_NOT_IN_FAMILY"),
        (in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.4]])), {}, "ERROR_ATOMS_TOO_CLOSE"),
        (Atoms("H", cell=[[1, 0, 0], [0, 1, 0], [1, 1, 0]]), {}, "ERROR_ZERO_VOLUME"),
        (
            in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])),
            {"charge": 1},
            "ERROR_INVALID_CONFIGURATIONS",
        ),
    ],
)
def test_bad_configurations(atoms, settings, code):
    with pytest.raises(ConfigurationError) as error:
        _setup(atoms, settings)
    assert error.value.code == code


H2 = in_box(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))


@pytest.mark.parametrize(
    ("atoms", "settings", "code", "message"),
    [
        (H2, {"total_charge": "plus_one"}, "ERROR_INVALID_CONFIGURATIONS", "total_charge must be a finite"),
        (H2, {"total_charge": float("nan")}, "ERROR_INVALID_CONFIGURATIONS", "total_charge must be a finite"),
        (H2, {"total_charge": True}, "ERROR_INVALID_CONFIGURATIONS", "total_charge must be a finite"),
        (H2, {"total_spin": [1]}, "ERROR_INVALID_CONFIGURATIONS", "total_spin must be a finite"),
        (H2, {"external_field": [0.0, 0.1]}, "ERROR_INVALID_CONFIGURATIONS", "three finite numbers"),
        (H2, {"external_field": "z"}, "ERROR_INVALID_CONFIGURATIONS", "three finite numbers"),
        (H2, {"dipole_correction": "yes"}, "ERROR_INVALID_CONFIGURATIONS", "true or false"),
        (H2, {"parameters": {"SYSTEM": 3}}, "ERROR_INVALID_CONFIGURATIONS", "namelists"),
        # H2 at -50: 52 electrons where the neutral molecule has 2
        (H2, {"total_charge": -50}, "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN", "more than doubles"),
        # water has 8 valence electrons: a spin of 1 (or 9) cannot be made of whole N_up, N_down
        (in_box(molecule("H2O")), {"total_spin": 1}, "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN", "parity"),
        (in_box(molecule("H2O")), {"total_spin": 10}, "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN", "exceeds"),
    ],
)
def test_settings_of_the_wrong_type_and_impossible_charge_or_spin(atoms, settings, code, message):
    """Refused with the workchain's exit code before any pw.x input is built (never an exception)."""
    with pytest.raises(ConfigurationError, match=message) as error:
        _setup(atoms, settings)
    assert error.value.code == code


def test_possible_charges_and_spins_are_kept():
    """The bounds leave real cases alone: H2 at -2, a triplet O2, a metal's fractional spin."""
    assert _setup(H2, {"total_charge": -2}).n_electrons == 4
    assert _setup(in_box(molecule("O2")), {"total_spin": 2}).nspin == 2
    al = _setup(bulk("Al", "fcc", a=4.05, cubic=True), {"total_spin": 0.5})
    assert al.is_metal and al.parameters["SYSTEM"]["tot_magnetization"] == 0.5


def test_kpoints_mesh_spacing():
    al = bulk("Al", "fcc", a=4.05, cubic=True)
    assert kpoints_mesh(al, 0.25, []) == [7, 7, 7]
    assert kpoints_mesh(al, 0.25, [2]) == [7, 7, 1]


def test_planar_average_and_vacuum_levels():
    grid = np.zeros((4, 5, 100))
    z = np.arange(100) / 100
    profile = np.where(z < 0.5, 0.0, 1.0) + 0.1 * np.sin(2 * np.pi * z) * (z < 0.3)
    grid[:] = profile
    assert np.allclose(planar_average(grid, 2), profile)
    top, bottom = vacuum_levels(profile, emaxpos=0.9, eopreg=0.05)
    assert top == pytest.approx(1.0) and bottom == pytest.approx(1.0)
    top, bottom = vacuum_levels(profile, emaxpos=0.45, eopreg=0.1)
    assert top == pytest.approx(0.0) and bottom == pytest.approx(1.0)


def test_parallelization_is_a_checked_protocol_key():
    """``parallelization`` takes aiida-quantumespresso's flag names and positive whole numbers only."""
    assert get_protocol_inputs("fast")["parallelization"] == {}
    merged = get_protocol_inputs("fast", {"parallelization": {"npool": 4, "ndiag": 1}})
    assert merged["parallelization"] == {"npool": 4, "ndiag": 1}
    assert check_protocol_inputs(merged, "fast")["parallelization"] == {"npool": 4, "ndiag": 1}
    refused = [
        ({"nk": 2}, r"unknown flag 'nk' \(pw.x's -nk is -npool: write npool\)"),
        ({"nimage": 2}, "unknown flag 'nimage'; allowed: npool, nband, ntg, ndiag"),
        ({"npool": 0}, "npool must be a positive whole number, got 0"),
        ({"npool": -2}, "positive whole number"),
        ({"npool": 1.5}, "positive whole number"),
        ({"npool": "2"}, "positive whole number"),
        ({"npool": True}, "positive whole number"),
        (4, "must be a mapping"),
    ]
    for value, message in refused:
        with pytest.raises(OverrideError, match=message):
            get_protocol_inputs("fast", {"parallelization": value})
        if isinstance(value, dict):  # complete inputs given back are checked the same way
            with pytest.raises(OverrideError, match=message):
                check_protocol_inputs({**merged, "parallelization": value}, "fast")


@pytest.mark.parametrize(
    ("flags", "withmpi", "processes", "message"),
    [
        ({"npool": 2}, False, 2, "needs pw.x under MPI"),
        ({"ntg": 2}, False, None, "needs pw.x under MPI"),
        ({"npool": 3}, True, 2, "npool x nband = 3 does not divide the 2 MPI processes"),
        ({"npool": 3}, True, 4, "npool x nband = 3 does not divide the 4 MPI processes"),
        ({"npool": 2}, True, 1, "does not divide the 1 MPI process of"),
        ({"npool": 2, "nband": 2}, True, 2, "npool x nband = 4 does not divide"),
        ({"ntg": 3}, True, 4, "ntg 3 does not divide the 4 processes of one band group"),
        ({"npool": 2, "ntg": 2}, True, 2, "ntg 2 does not divide the 1 processes of one band group"),
    ],
)
def test_parallelization_pw_x_stops_on_is_refused(flags, withmpi, processes, message):
    """What pw.x 6.7 stops on at once (measured with mpirun: ``invalid number of pools``, ``invalid
    number of band groups``, ``nyfft value incompatible with nproc_bgrp``), refused before it runs."""
    from aiida_emlip.workflows.pw_inputs import check_parallelization

    with pytest.raises(ConfigurationError, match=message) as error:
        check_parallelization(flags, withmpi, processes)
    assert error.value.code == "ERROR_INVALID_PARALLELIZATION"


@pytest.mark.parametrize(
    ("flags", "withmpi", "processes"),
    [
        ({"npool": 2}, True, 2),  # pw.x 6.7: "K-points division: npool = 2"
        ({"npool": 2}, True, None),  # processes not known: pw.x decides
        ({"npool": 1, "ntg": 1}, False, 1),  # nothing parallel: serial is fine
        ({"npool": 2, "nband": 2}, True, 4),
        ({"npool": 2, "ntg": 2}, True, 4),  # pw.x 6.7 ran it
        ({"ndiag": 4}, True, 2),  # pw.x lowers ndiag to what it can use (ran)
        ({"ndiag": 4}, False, 1),
    ],
)
def test_parallelization_pw_x_runs_is_kept(flags, withmpi, processes):
    from aiida_emlip.workflows.pw_inputs import check_parallelization

    check_parallelization(flags, withmpi, processes)


def test_pw_cmdline_follows_aiida_quantumespresso_order():
    from aiida_emlip.workflows.protocol import parallelization_flags
    from aiida_emlip.workflows.pw_inputs import pw_cmdline

    flags = parallelization_flags()
    assert flags == ("npool", "nband", "ntg", "ndiag")
    assert pw_cmdline({"ndiag": 4, "npool": 2}, flags) == ["-npool", "2", "-ndiag", "4"]
    assert pw_cmdline({}, flags) == []


def test_parallelization_is_recorded_but_not_in_the_digest():
    """The same DFT settings with and without k-point pools have one digest (as with and without the
    profile's code UUID); any DFT setting still changes it."""
    from aiida_emlip.data.dataset import dft_settings_digest

    settings = {"code": "pw@cluster", "ecutwfc": 30.0, "protocol_inputs": get_protocol_inputs("fast")}
    settings["protocol_inputs"].pop("parallelization")
    settings["protocol_inputs"].pop("options")
    pooled = {**settings, "parallelization": {"npool": 4}, "code_uuid": "0000"}
    assert dft_settings_digest(pooled) == dft_settings_digest(settings) != ""
    assert dft_settings_digest({**pooled, "ecutwfc": 31.0}) != dft_settings_digest(settings)
