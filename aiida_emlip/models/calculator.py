"""ASE calculator for aiida-emlip models (energy, forces, stress, charges, dipole)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes

from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.io import load_model, resolve_device
from aiida_emlip.models.model import EmlipModel

#: Results that must be finite (the SCF flags and iteration counts are not numbers of the physics).
CHECKED = ("energy", "forces", "stress", "charges", "dipole", "atomic_dipoles", "fermi_level")


class NonFinitePredictionError(CalculationFailed):
    """The model predicted NaN or inf; ``quantities`` names the outputs concerned."""

    def __init__(self, quantities: list[str], formula: str) -> None:
        self.quantities = tuple(quantities)
        super().__init__(f"the model predicted non-finite (NaN or inf) {', '.join(quantities)} for {formula}")


def non_finite(results: dict, names: tuple[str, ...] = CHECKED) -> list[str]:
    """The entries of ``results`` among ``names`` that hold a NaN or an inf."""
    return [name for name in names if name in results and not np.isfinite(results[name]).all()]


class EmlipCalculator(Calculator):
    """Evaluate an :class:`EmlipModel` on ASE ``Atoms``; total charge and field from ``atoms.info``.

    Extra results: ``charges`` (e), ``atomic_dipoles`` (e·Å), ``dipole`` (e·Å), ``fermi_level`` (eV,
    heads that determine μ), ``converged`` and ``iterations`` (iterative heads). A NaN or inf in any
    output raises :class:`NonFinitePredictionError` (an ASE ``CalculationFailed``); nothing is cached.
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "charges",
        "dipole",
    ]

    def __init__(self, model: EmlipModel | str | Path, device: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        device = resolve_device(device)
        self.model = model.to(device) if isinstance(model, EmlipModel) else load_model(model, device)
        self.model.eval()

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all())
        graph = build_graph([self.atoms], self.model.cutoff, self.model.dtype, self.model.device)
        out = self.model(graph, compute_forces=True, compute_stress=periodic)

        def numpy(key: str):
            value = out.get(key)
            return None if value is None else value.detach().cpu().numpy()

        energy = float(numpy("energy")[0])
        self.results = {"energy": energy, "free_energy": energy, "forces": numpy("forces")}
        if periodic:
            stress = numpy("stress")[0]
            self.results["stress"] = stress.reshape(9)[[0, 4, 8, 5, 2, 1]]
        charges = numpy("charges")
        self.results["charges"] = charges if charges is not None else np.zeros(len(self.atoms))
        self.results["dipole"] = numpy("dipole")[0]
        for key, name in (
            ("dipoles", "atomic_dipoles"),
            ("fermi_level", "fermi_level"),
            ("converged", "converged"),
            ("iterations", "iterations"),
        ):
            value = numpy(key)
            if value is not None:
                self.results[name] = value if key == "dipoles" else value[0]
        bad = non_finite(self.results)
        if bad:
            formula = self.atoms.get_chemical_formula()
            self.reset()  # no NaN stays cached for the next property request
            raise NonFinitePredictionError(bad, formula)
