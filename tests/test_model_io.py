"""Model files, the ASE calculator, graphs and the backbone's equivariance."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from ase import Atoms
from models_helpers import ELEMENTS, HEAD_CONFIGS, evaluate, nacl_cell, tiny_model, water_cluster
from scipy.spatial.transform import Rotation

from aiida_emlip.models.calculator import EmlipCalculator
from aiida_emlip.models.graph import build_graph
from aiida_emlip.models.io import ModelFileError, load_model, read_metadata, save_model


@pytest.mark.parametrize("head", ["sr", "charges-weighted-dipoles", "split", "latent"])
def test_save_load_bit_identical(tmp_path, head):
    model = tiny_model(HEAD_CONFIGS[head], seed=11)
    with torch.no_grad():
        model.reference_energies.copy_(torch.randn_like(model.reference_energies))
    path = save_model(model, tmp_path / "model.safetensors", extra={"note": "test"})
    loaded = load_model(path)
    atoms = [nacl_cell(), water_cluster(1.0)]
    a, b = evaluate(model, atoms), evaluate(loaded, atoms)
    for key in ("energy", "forces", "charges", "dipole"):
        if a[key] is not None:
            assert torch.equal(a[key], b[key]), key
    meta = read_metadata(path)
    # the head as given, with the options a model resolves made explicit (split: cutoff and envelope)
    assert meta["config"]["head"] == model.config.head == loaded.config.head
    assert HEAD_CONFIGS[head].items() <= meta["config"]["head"].items()
    assert meta["extra"] == {"note": "test"}
    assert {"torch", "mace-torch", "torch-pme", "aiida-emlip"} <= set(meta["versions"])


def test_pickled_file_is_refused(tmp_path):
    model = tiny_model(HEAD_CONFIGS["sr"])
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelFileError, match="pickled checkpoints are refused"):
        load_model(path)
    raw = tmp_path / "evil.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="not a safetensors model"):
        load_model(raw)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_config_with_unknown_keys_is_refused():
    from aiida_emlip.models.model import ModelConfig

    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig(elements=["H"], backbone={"channels": 4})
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(elements=["H"], dtype="float16")


def test_calculator_matches_model_and_reads_info():
    model = tiny_model(HEAD_CONFIGS["charges"], seed=3)
    atoms = nacl_cell()
    atoms.info["total_charge"] = 1.0
    atoms.calc = EmlipCalculator(model, device="cpu")
    out = evaluate(model, atoms)
    assert atoms.get_potential_energy() == pytest.approx(float(out["energy"][0]), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), out["forces"].numpy(), atol=1e-12)
    assert atoms.get_charges().sum() == pytest.approx(1.0, abs=1e-12)
    voigt = atoms.get_stress()
    full = out["stress"][0].numpy()
    np.testing.assert_allclose(voigt, full.reshape(9)[[0, 4, 8, 5, 2, 1]], atol=1e-12)


def test_calculator_runs_md_with_energy_conservation():
    """NVE with the model conserves total energy (forces are exact gradients)."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = water_cluster()
    atoms.calc = EmlipCalculator(tiny_model(HEAD_CONFIGS["split"], seed=2), device="cpu")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    energies = []
    for _ in range(20):
        dyn.run(1)
        energies.append(atoms.get_total_energy())
    drift = max(energies) - min(energies)
    kinetic = atoms.get_kinetic_energy()
    assert drift < 1e-3 * max(kinetic, 1e-2)


def test_graph_neighbours_and_periodicity():
    atoms = nacl_cell()
    graph = build_graph([atoms, water_cluster()], cutoff=3.5)
    assert graph.num_graphs == 2 and graph.num_atoms == len(atoms) + 5
    vectors = graph.edge_vectors(graph.positions, graph.cell)
    lengths = torch.linalg.vector_norm(vectors, dim=-1)
    in_crystal = graph.batch[graph.edge_index[1]] == 0
    assert float(lengths.max()) <= 3.5 and float(lengths[in_crystal].min()) > 2.0
    # every atom of rock salt (a = 5.64, rattled) has 6 neighbours within 3.5 Å
    counts = torch.bincount(graph.edge_index[1][in_crystal], minlength=8)
    assert counts.tolist() == [6] * 8
    with pytest.raises(ValueError, match="non-zero volume"):
        build_graph([Atoms("H", pbc=True)], cutoff=3.0)


def test_backbone_vectors_are_equivariant():
    model = tiny_model(HEAD_CONFIGS["sr"])
    atoms = water_cluster()
    rot = Rotation.random(random_state=5).as_matrix()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    feats = []
    for a in (atoms, turned):
        g = build_graph([a], model.cutoff, model.dtype)
        feats.append(model.backbone(g, g.positions, g.cell))
    torch.testing.assert_close(feats[1].scalars, feats[0].scalars, atol=1e-10, rtol=0)
    torch.testing.assert_close(feats[1].vectors, feats[0].vectors @ torch.tensor(rot.T), atol=1e-10, rtol=0)
    assert float(feats[0].vectors.abs().max()) > 1e-4


def test_float32_model_runs_and_agrees_with_float64():
    m64 = tiny_model(HEAD_CONFIGS["charges"], seed=4)
    m32 = tiny_model(HEAD_CONFIGS["charges"], seed=4, dtype="float32")
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    a, b = evaluate(m64, nacl_cell()), evaluate(m32, nacl_cell())
    assert b["energy"].dtype == torch.float32
    assert float(b["energy"][0]) == pytest.approx(float(a["energy"][0]), rel=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("head", list(HEAD_CONFIGS))
def test_cuda_matches_cpu(head):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model(HEAD_CONFIGS[head], seed=8)
    atoms = [nacl_cell(), water_cluster(0.0)]
    cpu = evaluate(model, atoms)
    gpu = evaluate(model.to("cuda"), atoms)
    assert gpu["energy"].device.type == "cuda"
    torch.testing.assert_close(gpu["energy"].cpu(), cpu["energy"], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(gpu["forces"].cpu(), cpu["forces"], atol=1e-8, rtol=1e-8)


def boxed_molecules() -> list[Atoms]:
    """Three H₂O + Na + Cl clusters of charges +1, 0 and −1 in equal 8 × 8 × 12 Å boxes, as the
    long-range training sets hold small molecules: the cells share one Ewald sum."""
    frames = []
    for k, charge in enumerate((1.0, 0.0, -1.0)):
        atoms = water_cluster(charge)
        atoms.cell = [8.0, 8.0, 12.0]
        atoms.pbc = True
        atoms.center()
        atoms.positions += np.random.default_rng(k).normal(scale=0.05, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def _force_loss_gradients(model, atoms: list[Atoms]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Energies, forces and the gradient of a training step's loss over the model's parameters."""
    device = next(model.parameters()).device
    graph = build_graph(atoms, model.cutoff, model.dtype, device=device)
    out = model(graph, compute_stress=False, create_graph=True)
    loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out["energy"].detach().cpu(), out["forces"].detach().cpu(), [g for g in grads if g is not None]


@pytest.mark.cuda
@pytest.mark.parametrize("head", ["charges-weighted-dipoles", "split", "qeq", "scf"])
def test_cuda_training_step_on_boxed_molecules_matches_cpu(head):
    """The batched Ewald path (torch.vmap over padded cells; the qeq and scf heads' shared blocks and
    projected potentials) on CUDA: energies, forces and a force loss's parameter gradients (double
    backward) equal the CPU's, with induced dipoles as the presets train them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from aiida_emlip.models import ewald_batch
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(3)
    backbone = {"num_channels": 4, "num_interactions": 2, "correlation": 2, "max_ell": 2, "r_max": 4.0}
    config = ModelConfig(
        elements=ELEMENTS, head=HEAD_CONFIGS[head], backbone={**backbone, "mlp_hidden": 4},
        induction={"enabled": True}, dtype="float64",
    )  # fmt: skip
    model = EmlipModel(config)
    atoms = boxed_molecules()
    graph = build_graph(atoms, model.cutoff, model.dtype)
    es = model.electrostatics
    groups, _ = ewald_batch.members(es, graph.positions, graph.cell, graph.pbc, graph.ptr, False, True)
    assert [[m.index for m in group] for group in groups] == [[0, 1, 2]]  # the path under test
    e_cpu, f_cpu, g_cpu = _force_loss_gradients(model, atoms)
    e_gpu, f_gpu, g_gpu = _force_loss_gradients(model.to("cuda"), atoms)
    torch.testing.assert_close(e_gpu, e_cpu, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(f_gpu, f_cpu, atol=1e-9, rtol=1e-9)
    assert len(g_gpu) == len(g_cpu)
    for got, want in zip(g_gpu, g_cpu):
        torch.testing.assert_close(got.cpu(), want, atol=1e-8 * float(want.abs().max()) + 1e-12, rtol=1e-7)
