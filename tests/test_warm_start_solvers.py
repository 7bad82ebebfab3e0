"""Warm starts of the iterative heads: the ASE calculator starts each charge solve from the previous
step's charges (MD, optimisation) — fewer iterations, the same result within the solver's tolerance.
``qeq`` (projected CG from the previous charges), ``scf`` (the fixed-point iteration) and the heads
with charge along bonds (Newton in the bond potentials)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from models_helpers import HEAD_CONFIGS, nacl_cell, tiny_model

from aiida_emlip.models.calculator import EmlipCalculator

#: Production-like tolerances; qeq on its CG solver (the dense solve of small cells needs no start).
HEADS = {
    "qeq": ({"name": "qeq", "solver": "cg", "tol": 1e-6}, 0.9),
    "scf": ({**HEAD_CONFIGS["scf-mlp"], "tol": 1e-6}, 0.95),
    # charge along bonds, Newton in the bond potentials started from the previous charges' potentials:
    # the functional's Newton steps fall from 3-5 to 1-2; qeq's single step saves little (its CG must
    # still remove a residual spread over every mode)
    "qeq-bonds": ({"name": "qeq", "fragments": "bonds", "solver": "cg", "tol": 1e-6}, 1.0),
    "functional-bonds": ({"name": "functional", "fragments": "bonds", "solver": "cg", "tol": 1e-6}, 0.5),
}


def _trajectory(atoms: Atoms, steps: int, seed: int = 3, amplitude: float = 0.01) -> list[Atoms]:
    """Small random displacements accumulated step by step, like consecutive MD frames."""
    rng = np.random.default_rng(seed)
    frames, current = [], atoms.copy()
    for _ in range(steps):
        current = current.copy()
        current.positions += rng.normal(scale=amplitude, size=current.positions.shape)
        frames.append(current)
    return frames


def _run(calc: EmlipCalculator, frames: list[Atoms]) -> list[dict]:
    out = []
    for frame in frames:
        frame = frame.copy()
        frame.calc = calc
        out.append(
            {
                "energy": frame.get_potential_energy(),
                "forces": frame.get_forces(),
                "charges": calc.results["charges"].copy(),
                "iterations": int(calc.results["iterations"]),
            }
        )
    return out


@pytest.mark.parametrize("head", sorted(HEADS))
def test_warm_start_saves_iterations_and_keeps_the_result(head):
    config, most = HEADS[head]
    model = tiny_model(config, seed=2)
    frames = _trajectory(nacl_cell().repeat((2, 2, 2)), steps=5)  # 64 atoms, 0.01 Å steps
    warm = _run(EmlipCalculator(model, device="cpu"), frames)
    cold = _run(EmlipCalculator(model, device="cpu", warm_start=False), frames)
    # the first step has nothing to start from: the same run
    assert warm[0]["iterations"] == cold[0]["iterations"]
    assert warm[0]["energy"] == cold[0]["energy"]
    later_warm = sum(step["iterations"] for step in warm[1:])
    later_cold = sum(step["iterations"] for step in cold[1:])
    # measured: qeq 24 vs 28 CG iterations (the mesh preconditioner takes 7 a step from scratch),
    # scf (mlp update) 34 vs 48 fixed-point steps, qeq-bonds 42 vs 45 and functional-bonds 44 vs 143
    # CG iterations
    assert later_warm <= most * later_cold, (later_warm, later_cold)
    for w, c in zip(warm, cold):
        # both converged to the solver's tolerance (1e-6) from their own starts
        np.testing.assert_allclose(w["charges"], c["charges"], atol=2e-6)
        assert w["energy"] == pytest.approx(c["energy"], abs=1e-6)
        np.testing.assert_allclose(w["forces"], c["forces"], atol=1e-5)


def test_projected_cg_from_any_start_equals_the_kkt_solve():
    """qeq's warm-start solver on Σq = Q against the dense KKT solve, from a cold and a near start."""
    import torch

    from aiida_emlip.models.heads.solvers import qeq_solve, qeq_solve_from

    gen = torch.Generator().manual_seed(0)
    n = 200
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    a = a @ a.T / n
    d = torch.rand(n, dtype=torch.float64, generator=gen) + 0.5
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    exact = qeq_solve(None, d, b, 1.0, dense=a)
    cold = qeq_solve(lambda x: a @ x, d, b, 1.0, precond=d + a.diagonal(), tol=1e-10)
    near = exact.charges + 1e-3 * torch.randn(n, dtype=torch.float64, generator=gen)
    for start in (torch.zeros(n, dtype=torch.float64), near):
        q, mu, info = qeq_solve_from(lambda x: a @ x, d, b, 1.0, start, precond=d + a.diagonal(), tol=1e-10)
        assert info.converged and float(q.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float((q - exact.charges).abs().max()) < 1e-9
        assert float(mu) == pytest.approx(float(exact.mu), abs=1e-10)
        if start is near:  # measured: 19 against 26 CG iterations from scratch
            assert info.iterations < cold.info.iterations
        else:
            assert info.iterations == cold.info.iterations


def test_cold_start_repeats_bit_for_bit_and_other_atoms_start_cold():
    """warm_start=False: a single point does not depend on what came before; a different system (other
    elements, or another total charge) never starts from the previous charges."""
    model = tiny_model(HEADS["qeq"][0], seed=2)
    a, b = _trajectory(nacl_cell().repeat((2, 1, 1)), steps=2)
    cold = EmlipCalculator(model, device="cpu", warm_start=False)
    first = _run(cold, [a])[0]
    _run(cold, [b])
    again = _run(cold, [a])[0]
    assert again["energy"] == first["energy"] and again["iterations"] == first["iterations"]
    np.testing.assert_array_equal(again["charges"], first["charges"])

    warm = EmlipCalculator(model, device="cpu")
    _run(warm, [a])
    assert (
        _run(warm, [b])[0]["iterations"]
        < _run(EmlipCalculator(model, warm_start=False), [b])[0]["iterations"]
    )
    swapped = b.copy()
    swapped.numbers = swapped.numbers[::-1]  # other elements on the sites
    fresh = _run(EmlipCalculator(model, device="cpu", warm_start=False), [swapped])[0]
    assert _run(warm, [swapped])[0]["iterations"] == fresh["iterations"]
    charged = swapped.copy()
    charged.info["total_charge"] = 1.0
    fresh = _run(EmlipCalculator(model, device="cpu", warm_start=False), [charged])[0]
    result = _run(warm, [charged])[0]
    assert result["iterations"] == fresh["iterations"] and result["energy"] == fresh["energy"]


def test_calculator_recomputes_when_the_charge_or_field_changes():
    """ASE compares positions, cell and numbers only; the calculator also compares the settings the
    model reads from atoms.info, so the same geometry at another total charge or field is recomputed."""
    model = tiny_model(HEADS["qeq"][0], seed=2)
    atoms = nacl_cell()
    atoms.calc = EmlipCalculator(model, device="cpu")
    neutral = atoms.get_potential_energy()
    atoms.info["total_charge"] = 1.0
    charged = atoms.get_potential_energy()
    assert charged != neutral and float(atoms.calc.results["charges"].sum()) == pytest.approx(1.0)
    atoms.info["external_field"] = [0.0, 0.0, 0.05]
    assert atoms.get_potential_energy() != charged
    del atoms.info["external_field"]
    assert atoms.get_potential_energy() == pytest.approx(charged, abs=1e-9)
