"""pw.x inputs of one configuration: charge, spin, smearing, slab dipole correction, sawtooth field.

No AiiDA import: the functions take ASE ``Atoms`` and plain dicts so that they can be unit-tested and
reused. Conventions (pinned against pw.x by ``tests/test_qe_conventions.py``):

* ``external_field`` is the physical field E in V/Å (force on a charge q is qE). pw.x's ``eamp`` is in
  Hartree atomic units (1 a.u. = 51.422 V/Å) and a positive ``eamp`` is a field along +``edir``:
  ``eamp = E·n / 51.422`` with n the unit normal of the lattice planes of axis ``edir``.
* ``tot_charge`` = Q (pw.x adds a uniform compensating background).
* Slabs (vacuum along exactly one axis) get ``tefield``/``dipfield`` with ``edir`` = that axis and the
  sawtooth turning over inside the vacuum (``emaxpos``, ``eopreg``).
* A field always comes with the dipole correction along its axis (``dipfield``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.structures.geometry import cell_volume, min_interatomic_distance, vacuum_axes, vacuum_center

#: Elements treated as metallic by ``electronic_type: auto``.
METALS = frozenset(
    "Li Na K Rb Cs Be Mg Ca Sr Ba Al Ga In Sn Pb Sc Ti V Cr Mn Fe Co Ni Cu Zn Y Zr Nb Mo Ru Rh Pd Ag Cd "
    "Hf Ta W Re Os Ir Pt Au".split()
)
#: Keys allowed in the per-configuration settings.
CONFIG_KEYS = frozenset(
    {
        schema.TOTAL_CHARGE,
        schema.TOTAL_SPIN,
        schema.EXTERNAL_FIELD,
        schema.CONFIG_TYPE,
        "electronic_type",
        "dipole_correction",
        "parameters",
    }
)


class ConfigurationError(ValueError):
    """A configuration that must not reach pw.x; ``code`` names the workchain exit code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass
class PwSetup:
    """The pw.x parameters, k-point mesh and the facts the label collection needs."""

    parameters: dict[str, dict[str, Any]]
    kpoints_mesh: list[int]
    n_electrons: float
    is_metal: bool
    nspin: int
    periodic_bulk: bool
    edir: int | None = None
    slab: bool = False
    notes: list[str] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def mpi_option(code_with_mpi: bool | None, default: bool) -> bool:
    """``metadata.options.withmpi`` of a calculation on a code: what the code says when it says it
    (``verdi code create --with-mpi`` / ``--no-with-mpi``, ``aiida-emlip setup --mpi``), else ``default``.

    AiiDA refuses to submit a calculation whose ``withmpi`` option and code disagree (``Inconsistent
    requirements as to whether code ... should be run with or without MPI``), so an MPI code would
    otherwise fail every configuration under the protocol's ``withmpi: false``.
    """
    return default if code_with_mpi is None else bool(code_with_mpi)


def check_parallelization(
    parallelization: dict[str, int], withmpi: bool, mpiprocs: int | None, code: str = "the pw.x code"
) -> None:
    """Raise :class:`ConfigurationError` (``ERROR_INVALID_PARALLELIZATION``) for pw.x parallelisation
    flags (``{"npool": N, ...}``, already known to be positive whole numbers) that pw.x stops on.

    Pools (``npool``), band groups (``nband``) and task groups (``ntg``) above 1 need MPI (``withmpi``:
    what the calculations run with). With ``mpiprocs``, the MPI processes of the calculations'
    ``resources`` (``None``: not known, not checked), ``npool`` x ``nband`` must divide them and ``ntg``
    the processes of one band group, as pw.x 6.7 demands (``invalid number of pools``, ``nyfft value
    incompatible with nproc_bgrp``). ``ndiag`` is not checked: pw.x lowers it to what it can use.
    """
    parallel = {flag: n for flag, n in parallelization.items() if n > 1 and flag != "ndiag"}
    if not parallel:
        return
    given = ", ".join(f"{flag} {n}" for flag, n in parallel.items())
    if not withmpi:
        raise ConfigurationError(
            "ERROR_INVALID_PARALLELIZATION",
            f"parallelization {given} needs pw.x under MPI, but {code} runs without MPI (a code made "
            "with --with-mpi runs under mpirun; for a code that says neither, set options.withmpi: true)",
        )
    if mpiprocs is None:
        return
    processes = f"{mpiprocs} MPI process{'es' * (mpiprocs != 1)} of options.resources"
    groups = parallelization.get("npool", 1) * parallelization.get("nband", 1)
    if mpiprocs % groups:
        raise ConfigurationError(
            "ERROR_INVALID_PARALLELIZATION",
            f"parallelization {given}: npool x nband = {groups} does not divide the {processes}",
        )
    ntg = parallelization.get("ntg", 1)
    if (mpiprocs // groups) % ntg:
        raise ConfigurationError(
            "ERROR_INVALID_PARALLELIZATION",
            f"parallelization {given}: ntg {ntg} does not divide the {mpiprocs // groups} processes of "
            f"one band group (the {processes} / npool x nband = {groups})",
        )


def pw_cmdline(parallelization: dict[str, int], flags: tuple[str, ...]) -> list[str]:
    """pw.x's command-line flags of ``parallelization`` as aiida-quantumespresso's ``PwCalculation``
    writes them: ``-<flag> N`` in the order of ``flags`` (its enabled flags), e.g. ``["-npool", "2"]``."""
    cmdline: list[str] = []
    for flag in flags:
        if flag in parallelization:
            cmdline += [f"-{flag}", str(parallelization[flag])]
    return cmdline


def check_settings(settings: dict[str, Any]) -> None:
    """Raise :class:`ConfigurationError` for unknown per-configuration keys and for values of the wrong
    type or shape (a total charge or spin that is not a finite number, a field that is not three)."""
    bad = sorted(set(settings) - CONFIG_KEYS)
    if bad:
        raise ConfigurationError(
            "ERROR_INVALID_CONFIGURATIONS",
            f"unknown configuration setting(s) {bad}; allowed: {sorted(CONFIG_KEYS)}",
        )
    for key in (schema.TOTAL_CHARGE, schema.TOTAL_SPIN):
        value = settings.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise ConfigurationError(
                "ERROR_INVALID_CONFIGURATIONS", f"{key} must be a finite number, got {value!r}"
            )
    if schema.EXTERNAL_FIELD in settings:
        value = settings[schema.EXTERNAL_FIELD]
        items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        if items is None or len(items) != 3 or not all(_is_number(v) and math.isfinite(v) for v in items):
            raise ConfigurationError(
                "ERROR_INVALID_CONFIGURATIONS",
                f"{schema.EXTERNAL_FIELD} must be three finite numbers (V/Å), got {value!r}",
            )
    if "dipole_correction" in settings and not isinstance(settings["dipole_correction"], bool):
        raise ConfigurationError(
            "ERROR_INVALID_CONFIGURATIONS",
            f"dipole_correction must be true or false, got {settings['dipole_correction']!r}",
        )
    parameters = settings.get("parameters")
    if parameters is not None and not (
        isinstance(parameters, dict) and all(isinstance(v, dict) for v in parameters.values())
    ):
        raise ConfigurationError(
            "ERROR_INVALID_CONFIGURATIONS",
            f"parameters must map pw.x namelists to their entries, got {parameters!r}",
        )


def check_charge_and_spin(
    neutral: float, n_electrons: float, total_charge: float, spin: float | None, fixed: bool
) -> None:
    """Raise :class:`ConfigurationError` (``ERROR_IMPOSSIBLE_CHARGE_OR_SPIN``) for a total charge that
    more than doubles the valence electrons of the neutral structure (``neutral``), a total spin
    larger than the electron count, or, with fixed occupations, a spin whose parity differs from the
    electron count's (N_up and N_down must be whole numbers)."""
    if -total_charge > neutral:
        raise ConfigurationError(
            "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN",
            f"total charge {total_charge:+g} adds {-total_charge:g} electrons to the {neutral:g} valence "
            "electrons of the neutral structure (more than doubles them); wrong sign or units?",
        )
    if spin is None:
        return
    if abs(spin) > n_electrons:
        raise ConfigurationError(
            "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN",
            f"total spin {spin:g} exceeds the {n_electrons:g} valence electrons",
        )
    whole = abs(n_electrons - round(n_electrons)) < 1e-6 and abs(spin - round(spin)) < 1e-6
    if fixed and (not whole or (round(n_electrons) - round(spin)) % 2):
        raise ConfigurationError(
            "ERROR_IMPOSSIBLE_CHARGE_OR_SPIN",
            f"total spin {spin:g} (N_up - N_down) with {n_electrons:g} valence electrons and fixed "
            "occupations: N_up and N_down would not be whole numbers (the spin must have the parity of "
            "the electron count)",
        )


def validate_geometry(atoms: Atoms, min_distance: float) -> None:
    """Raise :class:`ConfigurationError` for a zero-volume cell or atoms closer than ``min_distance`` Å."""
    volume = cell_volume(atoms)
    if volume < 1e-6:
        raise ConfigurationError("ERROR_ZERO_VOLUME", f"cell volume is {volume:.3g} Å^3")
    distance = min_interatomic_distance(atoms)
    if distance < min_distance:
        raise ConfigurationError(
            "ERROR_ATOMS_TOO_CLOSE", f"two atoms are {distance:.3f} Å apart (minimum {min_distance} Å)"
        )


def count_electrons(atoms: Atoms, z_valence: dict[str, float], total_charge: float) -> float:
    """Return the number of valence electrons for total charge Q; raise if none are left."""
    missing = sorted(set(atoms.get_chemical_symbols()) - set(z_valence))
    if missing:
        raise ConfigurationError("ERROR_ELEMENT_NOT_IN_FAMILY", f"no pseudopotential for {missing}")
    n = sum(z_valence[s] for s in atoms.get_chemical_symbols()) - total_charge
    if n <= 0:
        raise ConfigurationError(
            "ERROR_NO_ELECTRONS", f"total charge {total_charge:+g} leaves {n:g} valence electrons"
        )
    return float(n)


def kpoints_mesh(atoms: Atoms, distance: float, vacuum: list[int]) -> list[int]:
    """Return the Monkhorst–Pack mesh with spacing ``distance`` (1/Å, incl. 2π); 1 along vacuum axes."""
    recip = 2 * math.pi * np.linalg.norm(np.linalg.inv(np.asarray(atoms.cell[:], dtype=float)).T, axis=1)
    mesh = [max(1, math.ceil(length / distance - 1e-8)) for length in recip]
    for axis in vacuum:
        mesh[axis] = 1
    return mesh


def _field_axis(
    atoms: Atoms, field_vector: np.ndarray, vacuum: list[int], slab: int | None
) -> tuple[int, float]:
    """Return (edir index, field component in V/Å along the plane normal of that axis)."""
    cell = np.asarray(atoms.cell[:], dtype=float)
    normals = np.linalg.inv(cell).T
    normals /= np.linalg.norm(normals, axis=1)[:, None]
    magnitude = float(np.linalg.norm(field_vector))
    candidates = [slab] if slab is not None else vacuum
    for axis in candidates:
        component = float(field_vector @ normals[axis])
        if abs(abs(component) - magnitude) < 1e-6 * max(1.0, magnitude):
            others = [cell[j] for j in range(3) if j != axis]
            if all(
                abs(np.dot(cell[axis], o)) < 1e-6 * np.linalg.norm(o) * np.linalg.norm(cell[axis])
                for o in others
            ):
                return axis, component
    raise ConfigurationError(
        "ERROR_INVALID_FIELD",
        f"external field {field_vector.tolist()} V/Å must lie along the normal of a cell axis with vacuum "
        f"(vacuum axes: {vacuum}; slab axis: {slab}) that is orthogonal to the other two",
    )


def _sawtooth(atoms: Atoms, axis: int, eopreg: float) -> dict[str, Any]:
    centre = vacuum_center(atoms, axis)
    return {"edir": axis + 1, "emaxpos": round((centre - eopreg / 2.0) % 1.0, 6), "eopreg": eopreg}


def build_pw_setup(
    atoms: Atoms,
    settings: dict[str, Any],
    inputs: dict[str, Any],
    z_valence: dict[str, float],
    cutoffs: tuple[float, float],
) -> PwSetup:
    """Return the pw.x setup of ``atoms`` under the merged protocol ``inputs``.

    ``settings`` holds the per-configuration keys (:data:`CONFIG_KEYS`); ``cutoffs`` is
    ``(ecutwfc, ecutrho)`` in Ry for the whole dataset.
    """
    check_settings(settings)
    validate_geometry(atoms, float(inputs["min_distance"]))
    charge = float(settings.get(schema.TOTAL_CHARGE, 0.0))
    n_electrons = count_electrons(atoms, z_valence, charge)
    vacuum = vacuum_axes(atoms, float(inputs["vacuum_gap"]))
    slab = vacuum[0] if len(vacuum) == 1 else None
    electronic_type = settings.get("electronic_type", inputs["electronic_type"])
    if electronic_type not in ("auto", "metal", "insulator"):
        raise ConfigurationError("ERROR_INVALID_CONFIGURATIONS", f"electronic_type {electronic_type!r}")
    is_metal = (
        bool(METALS & set(atoms.get_chemical_symbols()))
        if electronic_type == "auto"
        else electronic_type == "metal"
    )
    periodic_bulk = not vacuum
    control: dict[str, Any] = {"calculation": "scf", "tprnfor": True, "tstress": periodic_bulk}
    system: dict[str, Any] = {"ecutwfc": cutoffs[0], "ecutrho": cutoffs[1]}
    electrons: dict[str, Any] = {
        "conv_thr": float(inputs["conv_thr_per_atom"]) * len(atoms),
        "electron_maxstep": int(inputs["electron_maxstep"]),
        "mixing_beta": float(inputs["mixing_beta"]),
    }
    notes: list[str] = []
    if charge:
        system["tot_charge"] = charge
    if is_metal:
        system.update(occupations="smearing", smearing=inputs["smearing"], degauss=float(inputs["degauss"]))
        # 50 % more bands than occupied (+4): PwBaseWorkChain's sanity check rejects an occupied top band
        system["nbnd"] = math.ceil(0.75 * n_electrons) + 4
    else:
        system["occupations"] = "fixed"
    spin = settings.get(schema.TOTAL_SPIN)
    neutral = n_electrons + charge
    check_charge_and_spin(neutral, n_electrons, charge, None if spin is None else float(spin), not is_metal)
    odd = abs(round(n_electrons) % 2) == 1 or abs(n_electrons - round(n_electrons)) > 1e-6
    nspin = 2 if (spin is not None or odd) else 1
    kinds = sorted(set(atoms.get_chemical_symbols()))
    if nspin == 2:
        system["nspin"] = 2
        system["starting_magnetization"] = {kind: float(inputs["starting_magnetization"]) for kind in kinds}
        if spin is not None:
            system["tot_magnetization"] = float(spin)
        elif not is_metal:
            system["tot_magnetization"] = 1.0
            notes.append("odd electron count with fixed occupations: doublet (tot_magnetization = 1)")
    edir = None
    field_vector = np.asarray(settings.get(schema.EXTERNAL_FIELD, np.zeros(3)), dtype=float).reshape(3)
    has_field = bool(np.any(np.abs(field_vector) > 0))
    if slab is not None and settings.get("dipole_correction", inputs["dipole_correction"]):
        edir = slab
        control.update(tefield=True, dipfield=True)
        system.update(_sawtooth(atoms, slab, float(inputs["eopreg"])), eamp=0.0)
    if has_field:
        axis, component = _field_axis(atoms, field_vector, vacuum, slab)
        edir = axis
        # The dipole correction along edir keeps periodic images from screening the field; it is also
        # needed because aiida-quantumespresso 5.1 fails on the empty <electric_field/> that pw.x 6.7
        # writes for tefield without dipfield.
        control.update(tefield=True, dipfield=True)
        system.update(_sawtooth(atoms, axis, float(inputs["eopreg"])))
        system["eamp"] = component / schema.FIELD_AU_IN_V_PER_A
    parameters = {"CONTROL": control, "SYSTEM": system, "ELECTRONS": electrons}
    for source in (inputs.get("parameters") or {}, settings.get("parameters") or {}):
        for namelist, entries in source.items():
            parameters.setdefault(namelist, {}).update(entries)
    mesh = kpoints_mesh(atoms, float(inputs["kpoints_distance"]), vacuum)
    return PwSetup(
        parameters, mesh, n_electrons, is_metal, nspin, periodic_bulk, edir, slab is not None, notes
    )
