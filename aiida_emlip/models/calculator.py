"""ASE calculator for aiida-emlip models (energy, forces, stress, charges, dipole)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes

from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.heads.replay import replayed_iterations
from aiida_emlip.models.host_memory import retain_freed_memory, retain_on_cpu
from aiida_emlip.models.io import load_model, resolve_device
from aiida_emlip.models.model import EmlipModel
from aiida_emlip.schema import EXTERNAL_FIELD, FERMI_LEVEL, TOTAL_CHARGE, TOTAL_SPIN

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


#: The ``atoms.info`` keys the model reads (the graph's per-structure settings).
INFO_SETTINGS = (TOTAL_CHARGE, TOTAL_SPIN, EXTERNAL_FIELD, FERMI_LEVEL)


def _settings(atoms: Atoms) -> list[object]:
    """The values of :data:`INFO_SETTINGS` in ``atoms.info`` (``None`` when absent), comparable; a
    value that is not numeric as its ``repr`` (the graph builder refuses it with a message)."""
    out: list[object] = []
    for key in INFO_SETTINGS:
        value = atoms.info.get(key)
        try:
            out.append(None if value is None else np.atleast_1d(np.asarray(value, float)).tolist())
        except (TypeError, ValueError):
            out.append(repr(value))
    return out


class EmlipCalculator(Calculator):
    """Evaluate an :class:`EmlipModel` on ASE ``Atoms``; total charge and field from ``atoms.info``.

    Extra results: ``charges`` (e), ``atomic_dipoles`` (e·Å), ``dipole`` (e·Å), ``fermi_level`` (eV,
    heads that determine μ), ``converged`` and ``iterations`` (iterative heads). A NaN or inf in any
    output raises :class:`NonFinitePredictionError` (an ASE ``CalculationFailed``); nothing is cached.

    ``warm_start`` (default on): the charge solve of the iterative heads (``qeq``'s CG, ``scf``'s
    fixed-point iteration, Newton's method in the bond potentials of ``fragments='bonds'``) starts from
    the charges of the previous calculation when the atoms (their
    number and elements) and the total charge are the same, as in MD or a geometry optimisation —
    fewer iterations per step; the result equals a cold start's to within the solver's tolerance.
    ``warm_start=False`` makes every call start from the local guess (bit-for-bit repeatable single
    points whatever was computed before).

    ``kernels='cueq'`` runs MACE's equivariant products on NVIDIA cuEquivariance (the same weights and
    results; faster on a GPU with its CUDA kernels installed), switching the model given (which can
    then no longer be saved); ``None`` keeps the model's kernels.

    ``cuda_graphs=True`` (on a CUDA device) records one iteration of ``qeq``'s charge solve as a CUDA
    graph per evaluation and replays it instead of launching its ~250 tensor operations from Python
    each time (:mod:`~aiida_emlip.models.heads.replay`); off by default, the same results to round-off.

    ``retain_memory`` (default: on the CPU) keeps freed host memory in the process for the next
    evaluation (:func:`~aiida_emlip.models.host_memory.retain_freed_memory`: evaluations of 4k–17.6k-atom
    cells 1.3–3.3× faster, whose large tensors otherwise cost a page fault per 4 KiB each time, for a
    higher peak memory); it applies to the whole process. ``False``, or
    ``EMLIP_HOST_MEMORY=release`` in the environment, keeps the allocator's default behaviour.
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "charges",
        "dipole",
    ]

    def __init__(
        self,
        model: EmlipModel | str | Path,
        device: str = "auto",
        warm_start: bool = True,
        kernels: str | None = None,
        retain_memory: bool | None = None,
        cuda_graphs: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        device = resolve_device(device)
        if retain_memory is None:
            retain_on_cpu(device)
        elif retain_memory:
            retain_freed_memory()
        self.model = model.to(device) if isinstance(model, EmlipModel) else load_model(model, device)
        if kernels is not None:
            self.model.backbone.use_kernels(kernels)
        self.model.eval()
        self.warm_start = warm_start
        self.cuda_graphs = cuda_graphs
        self._previous: tuple[np.ndarray, float, np.ndarray] | None = None  # numbers, Q, charges

    def _initial_charges(self, total: float) -> torch.Tensor | None:
        """The previous calculation's charges when they may start this one's (total charge ``total``)
        charge solve (see the class)."""
        if not self.warm_start or self._previous is None:
            return None
        numbers, previous_total, charges = self._previous
        if previous_total == total and np.array_equal(numbers, self.atoms.numbers):
            return torch.as_tensor(charges)
        return None

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's changes (positions, cell, ...) plus ``info`` when a setting the model reads from
        ``atoms.info`` (total charge and spin, applied field, Fermi level) differs from the last
        calculation's: ASE alone would hand back the results of the other total charge."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and _settings(atoms) != _settings(self.atoms):
            changes.append("info")
        return changes

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all())
        graph = build_graph([self.atoms], self.model.cutoff, self.model.dtype, self.model.device)
        total = float(self.atoms.info.get(TOTAL_CHARGE, 0.0))
        with replayed_iterations("graph") if self.cuda_graphs else contextlib.nullcontext():
            out = self.model(
                graph,
                compute_forces=True,
                compute_stress=periodic,
                initial_charges=self._initial_charges(total),
            )

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
            self._previous = None
            raise NonFinitePredictionError(bad, formula)
        if charges is not None:
            self._previous = (self.atoms.numbers.copy(), total, charges.copy())
