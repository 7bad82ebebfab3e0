"""The one data schema: extxyz keys and units of every label (no AiiDA import).

Every layer (trainer, dataset workchain, models, evaluation) reads and writes labels through these
names. Units are eV, Å and e throughout. Stress follows ASE's sign convention (positive = tensile,
``stress = (1/V) ∂E/∂ε``); Quantum ESPRESSO prints the opposite sign and its parser output must be
negated before it is stored under :data:`STRESS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["structure", "atom"]


@dataclass(frozen=True)
class Label:
    """One label: its extxyz key, where it lives, its shape per structure or atom, and its unit."""

    key: str
    scope: Scope
    shape: tuple[int, ...]
    unit: str
    description: str


ENERGY = "energy"
FORCES = "forces"
STRESS = "stress"
CHARGES = "ref_charges"
ATOMIC_DIPOLES = "ref_dipoles"
LOWDIN_CHARGES = "lowdin_charges"
DIPOLE = "dipole"
TOTAL_CHARGE = "total_charge"
TOTAL_SPIN = "total_spin"
FERMI_LEVEL = "fermi_level"
FERMI_REFERENCE = "fermi_reference"
EXTERNAL_FIELD = "external_field"
POLARIZABILITY = "polarizability"
BORN_CHARGES = "born_charges"
CONFIG_TYPE = "config_type"

LABELS: dict[str, Label] = {
    label.key: label
    for label in (
        Label(ENERGY, "structure", (), "eV", "total energy"),
        Label(FORCES, "atom", (3,), "eV/Å", "forces, -∂E/∂r"),
        Label(STRESS, "structure", (3, 3), "eV/Å^3", "stress, (1/V)∂E/∂ε, ASE sign (QE's negated)"),
        Label(CHARGES, "atom", (), "e", "reference atomic charges (l = 0 multipoles)"),
        Label(ATOMIC_DIPOLES, "atom", (3,), "e·Å", "reference atomic dipoles (l = 1 multipoles)"),
        Label(LOWDIN_CHARGES, "atom", (), "e", "Löwdin charges Z_val − Löwdin population (projwfc.x)"),
        Label(DIPOLE, "structure", (3,), "e·Å", "total dipole of ions + electrons"),
        Label(TOTAL_CHARGE, "structure", (), "e", "total charge Q (QE tot_charge)"),
        Label(TOTAL_SPIN, "structure", (), "μB", "total magnetisation, N_up - N_down"),
        Label(FERMI_LEVEL, "structure", (), "eV", "Fermi level / chemical potential μ"),
        Label(FERMI_REFERENCE, "structure", (), "-", "what fermi_level is measured from"),
        Label(EXTERNAL_FIELD, "structure", (3,), "V/Å", "homogeneous applied field E (force qE)"),
        Label(POLARIZABILITY, "structure", (3, 3), "e·Å^2/V", "dipole response ∂d/∂E"),
        Label(
            BORN_CHARGES, "atom", (3, 3), "e", "Born effective charges Z*[i, α, β] = ∂F_iβ/∂E_α = ∂d_α/∂r_iβ"
        ),
        Label(CONFIG_TYPE, "structure", (), "-", "free-text tag used to group errors"),
    )
}

#: Largest plausible ``|force|`` in eV/Å: larger forces are taken for wrong units (meV/Å, eV/bohr ×
#: 1000, ...). The ``emlip.dataset`` node refuses them; ``emlip-train``'s default ``data.max_force``.
MAX_FORCE = 100.0

#: Allowed values of :data:`FERMI_REFERENCE`; ``model`` marks a model's μ, on the scale of its training data.
FERMI_REFERENCES = ("cell_average", "vacuum", "vbm_aligned", "model")

#: A head's ``formal_charges`` in a training config that the trainer replaces by each element's mean
#: reference charge (:data:`CHARGES`) over the training structures, as it fits reference energies.
MEAN_CHARGES = "mean"

#: Coulomb constant e^2/(4 π ε0) in eV·Å/e^2: ASE's value (CODATA 2014, Hartree × Bohr) to all digits, so
#: that energies agree with ASE's calculators beyond the 1e-8 relative floor a rounded constant sets.
COULOMB_CONSTANT = 14.399645351950548
#: One Hartree atomic unit of electric field in V/Å.
FIELD_AU_IN_V_PER_A = 51.42206747632590
#: Bohr radius in Å.
BOHR_IN_A = 0.529177210903
#: Hartree in eV.
HARTREE_IN_EV = 27.211386245988
#: Rydberg in eV.
RYDBERG_IN_EV = HARTREE_IN_EV / 2


def label(key: str) -> Label:
    """Return the :class:`Label` for ``key`` or raise ``KeyError`` listing the known keys."""
    try:
        return LABELS[key]
    except KeyError:
        raise KeyError(f"unknown label {key!r}; known labels: {', '.join(sorted(LABELS))}") from None
