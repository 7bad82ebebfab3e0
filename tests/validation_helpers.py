"""Models for the validation workchain tests: silent-backbone models, small models trained on pw.x labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def silent_model_node(
    tmp_path: Path, head: dict, elements: Sequence[str], sigma: float = 0.0, hardness: float | None = None
):
    """A stored model whose backbone is zero (the head's constants alone act); ``hardness`` sets J₀ of qeq."""
    import torch

    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        elements=list(elements),
        head=head,
        backbone={"num_channels": 4, "num_interactions": 1, "correlation": 1, "max_ell": 1, "r_max": 3.0},
        electrostatics={"sigma": sigma, "accuracy": 1e-8},
    )
    model = EmlipModel(config)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.zero_()
        if hardness is not None:
            model.head.hardness0.fill_(hardness)
    name = f"{head['name']}-{'-'.join(elements)}" + ("" if hardness is None else f"-{hardness}")
    return EmlipModelData(save_model(model, tmp_path / f"{name}.safetensors")).store()


def train_qeq_on_pw_labels(
    frames, codes: dict, pseudo_family: str, dft_overrides: dict, sigma: float | None = None
):
    """Label ``frames`` with pw.x (Hirshfeld charges with pp.x), then train a small ``qeq`` model on them.

    ``codes``: ``pw``, ``pp``, ``train``. Energies, forces and charges are supervised; 30 epochs.
    """
    electrostatics = None if sigma is None else {"sigma": sigma}
    return train_on_pw_labels(
        frames, codes, pseudo_family, dft_overrides, {"name": "qeq"}, electrostatics=electrostatics
    )


def train_on_pw_labels(
    frames,
    codes: dict,
    pseudo_family: str,
    dft_overrides: dict,
    head: dict,
    epochs: int = 30,
    backbone: dict | None = None,
    electrostatics: dict | None = None,
):
    """Label ``frames`` with pw.x (Hirshfeld charges with pp.x), then train a small model of ``head``.

    ``codes``: ``pw``, ``pp``, ``train``. Energies, forces and charges are supervised. The backbone is
    the demo's with 4 channels and one interaction, updated by ``backbone``. The training dataset is
    the model's ``creator.inputs.dataset``.
    """
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_emlip.calculations.train import EmlipTrainCalculation
    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain
    from aiida_emlip.workflows.demo import design_config

    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        codes["pw"], EmlipDatasetData(frames=frames).store(), pseudo_family, "fast", dft_overrides
    )
    builder.pp_code = codes["pp"]
    labels, node = run_get_node(builder)
    assert node.is_finished_ok and len(labels["dataset"].to_ase()) == len(frames), node.exit_message
    config = design_config(head, epochs=epochs)
    config["data"] = {"valid_fraction": 0.0, "test_fraction": 0.0, "batch_size": 2}
    config["loss"] = {"energy": 10.0, "forces": 1.0, "charges": 10.0}
    config["model"]["backbone"].update(num_channels=4, num_interactions=1, mlp_hidden=4, **(backbone or {}))
    if electrostatics is not None:
        config["model"]["electrostatics"] = dict(electrostatics)
    train = EmlipTrainCalculation.get_builder()
    train.code = codes["train"]
    train.dataset = labels["dataset"]
    train.config = orm.Dict(config)
    train.metadata.options = {"resources": {"num_machines": 1}, "max_wallclock_seconds": 600}
    results, node = run_get_node(train)
    assert node.is_finished_ok, node.exit_message
    return results["model"]


def untrained_twin(model, tmp_path: Path, seed: int = 0):
    """A stored model of the same configuration (architecture, head, electrostatics) as ``model``,
    with random weights (``seed``): the baseline a trained model must beat."""
    import torch

    from aiida_emlip.data.model import EmlipModelData
    from aiida_emlip.models.io import save_model
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    torch.manual_seed(seed)
    twin = EmlipModel(ModelConfig.from_dict(model.base.attributes.get("config")))
    return EmlipModelData(save_model(twin, tmp_path / f"untrained-{model.pk}.safetensors")).store()
