"""The training configuration: one YAML file, parsed strictly (unknown keys are an error)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aiida_emlip import schema
from aiida_emlip.training.errors import ConfigError

#: Quantities that can enter the loss, with the default weight of each.
LOSS_QUANTITIES = (
    "energy",
    "forces",
    "stress",
    "charges",
    "atomic_dipoles",
    "dipole",
    "fermi_level",
    "polarizability",
)
#: Loss quantity -> schema key of its label.
LABEL_OF = {
    "energy": schema.ENERGY,
    "forces": schema.FORCES,
    "stress": schema.STRESS,
    "charges": schema.CHARGES,
    "atomic_dipoles": schema.ATOMIC_DIPOLES,
    "dipole": schema.DIPOLE,
    "fermi_level": schema.FERMI_LEVEL,
    "polarizability": schema.POLARIZABILITY,
}
SCF_MODES = ("converge", "direct", "unrolled", "implicit")
#: Loss weights of the multipole labels switched on by ``multipoles: auto`` when the training data carry
#: them and the head predicts them (and the loss does not name them): charges in e, dipoles in e·Å.
AUTO_MULTIPOLE_WEIGHTS = {"charges": 10.0, "atomic_dipoles": 10.0}
#: Orders of the three l = 1 columns a ``data.keys`` mapping may read: Cartesian, or e3nn's real
#: spherical-harmonic order (y, z, x) used by FHI-aims multipole exports and the MACE ecosystem.
VECTOR_ORDERS = {"xyz": (0, 1, 2), "yzx": (2, 0, 1), "e3nn": (2, 0, 1)}
ENERGY_UNITS = {"eV": 1.0, "meV": 1e-3, "Ry": schema.RYDBERG_IN_EV, "Ha": schema.HARTREE_IN_EV}
LENGTH_UNITS = {"Å": 1.0, "A": 1.0, "Angstrom": 1.0, "bohr": schema.BOHR_IN_A}


@dataclass
class DataConfig:
    """Where the structures come from and how their labels are named."""

    train: str = ""
    valid: str | None = None
    test: str | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    batch_size: int = 4
    valid_batch_size: int = 16
    #: Schema key -> key in the file (e.g. ``energy: REF_energy``), or a column mapping of a per-atom
    #: array ``{key: REF_multipoles, columns: [1, 2, 3], order: yzx}`` (see :func:`check_key_mapping`).
    #: Unlisted keys map to themselves.
    keys: dict[str, Any] = field(default_factory=dict)
    #: Units of the file's energies and lengths; converted to eV and Å on reading.
    energy_unit: str = "eV"
    length_unit: str = "Å"
    #: ``fit`` (least squares on the training split) or a mapping element -> eV.
    reference_energies: Any = "fit"
    #: Largest plausible ``|force|`` (eV/Å) and ``|charge|`` (e); larger values are reported as wrong units.
    max_force: float = schema.MAX_FORCE
    max_charge: float = 10.0
    #: Move the reference atomic dipoles onto the reference charges (each atom's dipole onto charges of
    #: it and its neighbours within 1.6 Å, fragment charges unchanged): for heads without atomic dipoles,
    #: whose charges must then carry the whole molecular dipole (see ``training.dipole_charges``). The
    #: atomic-dipole labels keep only the part no neighbourhood charge could carry.
    charges_from_dipoles: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adam | adamw
    lr: float = 1e-2
    weight_decay: float = 0.0
    amsgrad: bool = False


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | cosine | plateau | step
    factor: float = 0.5  # plateau, step
    patience: int = 5  # plateau
    step_size: int = 10  # step
    min_lr: float = 0.0  # cosine, plateau


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.99


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # epochs without improvement of the validation loss; 0 disables
    min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    every: int = 10  # epochs; 0 writes only on signal and at the end
    file: str = "checkpoint.pt"


@dataclass
class StageConfig:
    """A stretch of epochs with its own SCF training mode and loss weights (merged over ``loss``)."""

    name: str = "main"
    epochs: int = 10
    scf_mode: str = "unrolled"
    weights: dict[str, float] = field(default_factory=dict)
    lr: float | None = None  # when set, the learning rate is reset to this value at the stage start


@dataclass
class TrainConfig:
    """Everything ``emlip-train`` reads (see docs/training.md for each key)."""

    data: DataConfig
    model: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "emlip-run"
    seed: int = 0
    device: str = "auto"
    loss: dict[str, float] = field(default_factory=lambda: {"energy": 1.0, "forces": 10.0})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    clip_grad_norm: float | None = 10.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    progress: str = "auto"  # auto | bar | log
    num_threads: int | None = None
    #: ``auto``: train on the data's reference charges/dipoles (weights AUTO_MULTIPOLE_WEIGHTS) when the
    #: head predicts them and the loss does not name them; ``off``: only what the loss names.
    multipoles: str = "auto"
    #: A model file (``.safetensors``) whose weights and reference energies start the run (warm start);
    #: its architecture must be that of ``model``. Relative paths are taken from the config file's
    #: directory. Optimiser, scheduler and EMA start fresh.
    init_from: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values (types are checked while parsing)."""
        if not self.data.train:
            raise ConfigError("data.train: the path of the training extxyz file is required")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self.data, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1), got {value}")
        if self.data.batch_size < 1 or self.data.valid_batch_size < 1:
            raise ConfigError("data.batch_size and data.valid_batch_size must be >= 1")
        unknown_keys = sorted(set(self.data.keys) - set(schema.LABELS))
        if unknown_keys:
            raise ConfigError(
                f"data.keys: unknown schema key(s) {unknown_keys}; known: {sorted(schema.LABELS)}"
            )
        for key, value in self.data.keys.items():
            check_key_mapping(key, value)
        _check_transfer_cutoff(self.model)
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("init_from must be the path of a model file (or null)")
        if self.multipoles not in ("auto", "off"):
            raise ConfigError(f"multipoles must be 'auto' or 'off', got {self.multipoles!r}")
        if self.data.energy_unit not in ENERGY_UNITS:
            raise ConfigError(
                f"data.energy_unit must be one of {sorted(ENERGY_UNITS)}, got {self.data.energy_unit!r}"
            )
        if self.data.length_unit not in LENGTH_UNITS:
            raise ConfigError(
                f"data.length_unit must be one of {sorted(LENGTH_UNITS)}, got {self.data.length_unit!r}"
            )
        ref = self.data.reference_energies
        if not (
            ref == "fit" or (isinstance(ref, dict) and all(isinstance(v, (int, float)) for v in ref.values()))
        ):
            raise ConfigError("data.reference_energies must be 'fit' or a mapping element -> energy in eV")
        _check_weights(self.loss, "loss")
        if self.optimizer.name not in ("adam", "adamw"):
            raise ConfigError(f"optimizer.name must be 'adam' or 'adamw', got {self.optimizer.name!r}")
        if self.optimizer.lr <= 0:
            raise ConfigError("optimizer.lr must be positive")
        if self.scheduler.name not in ("none", "cosine", "plateau", "step"):
            raise ConfigError(f"scheduler.name must be none|cosine|plateau|step, got {self.scheduler.name!r}")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ConfigError("ema.decay must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.progress not in ("auto", "bar", "log"):
            raise ConfigError(f"progress must be auto, bar or log, got {self.progress!r}")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        for i, stage in enumerate(self.stages):
            if stage.scf_mode not in SCF_MODES:
                raise ConfigError(f"stages[{i}].scf_mode must be one of {SCF_MODES}, got {stage.scf_mode!r}")
            if stage.epochs < 0:
                raise ConfigError(f"stages[{i}].epochs must be >= 0")
            _check_weights(stage.weights, f"stages[{i}].weights")
        model_keys = {"elements", "head", "backbone", "electrostatics", "dtype", "induction"}
        unknown = sorted(set(self.model) - model_keys)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown}; known: {sorted(model_keys)}")
        _check_induction(self.model.get("induction"))

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def set_total_epochs(self, total: int) -> None:
        """``--epochs N``: the last stage gets what the earlier stages leave of ``total`` epochs."""
        earlier = sum(stage.epochs for stage in self.stages[:-1])
        if total < max(earlier, 1):
            raise ConfigError(
                f"--epochs {total}: must be at least 1 and at least the {earlier} epoch(s) of the stages "
                f"before the last"
            )
        self.stages[-1].epochs = total - earlier

    def weights_at_stage(self, index: int) -> dict[str, float]:
        """Loss weights of stage ``index``: ``loss`` updated by the stage's ``weights``."""
        return {**dict.fromkeys(LOSS_QUANTITIES, 0.0), **self.loss, **self.stages[index].weights}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_transfer_cutoff(model: dict[str, Any]) -> None:
    """The ``split`` head's transfers and the bond conductances of ``fragments: bonds`` ride on the
    graph's edges: a cutoff beyond the backbone's r_max would make each jump to zero as its bond crosses
    r_max (charges and energy discontinuous)."""
    head, backbone = model.get("head") or {}, model.get("backbone") or {}
    if not isinstance(head, dict) or not isinstance(backbone, dict):
        return
    if head.get("name") == "split":
        key = "cutoff"
    elif head.get("fragments") == "bonds":
        key = "bond_cutoff"
    else:
        return
    cutoff, r_max = head.get(key), backbone.get("r_max", 5.0)
    if isinstance(cutoff, (int, float)) and isinstance(r_max, (int, float)) and cutoff > r_max:
        raise ConfigError(
            f"model.head.{key} {cutoff} Å exceeds the backbone's r_max {r_max} Å: the head's charge "
            "transfers ride on the graph's edges, which end at r_max, so each would jump to zero there; "
            f"leave {key} out (it is then r_max) or set it to r_max or less"
        )


def check_model_section(model: dict[str, Any]) -> None:
    """Build the model of ``model`` as the trainer does (elements: the section's, or a placeholder when
    they come from the data): unknown heads, head options and backbone values are a :class:`ConfigError`
    naming them, before any data is read. Imports torch."""
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    values = dict(model)
    values.setdefault("elements", _elements_named(model) or ["H"])
    try:
        EmlipModel(ModelConfig.from_dict(without_measured_charges(values)))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model: {exc}") from None


def mean_charges_wanted(model: dict[str, Any]) -> bool:
    """Whether a model section's head takes its base charges from the data (``mean``): ``split``, ``qeq``
    or ``functional`` (whose base charges only ``fragments: bonds`` uses)."""
    head = model.get("head")
    return (
        isinstance(head, dict)
        and head.get("name") in ("split", "qeq", "functional")
        and head.get("formal_charges") == schema.MEAN_CHARGES
    )


def without_measured_charges(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` with base charges that the trainer measures on the data (``mean``) left empty, so that
    the rest of the section builds and checks before any data is read; unchanged otherwise."""
    if not mean_charges_wanted(model):
        return model
    return {**model, "head": {**model["head"], "formal_charges": {}}}


def _elements_named(values: Any) -> list[str]:
    """Chemical symbols used as keys anywhere in ``values`` (per-element options such as a head's
    ``formal_charges``), ordered by atomic number: the elements a model check without data assumes."""
    from ase.data import atomic_numbers

    found: set[str] = set()

    def walk(item: Any) -> None:
        if isinstance(item, dict):
            found.update(k for k in item if isinstance(k, str) and k in atomic_numbers and k != "X")
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(values)
    return sorted(found, key=atomic_numbers.get)


def _weighted(config: TrainConfig) -> list[str]:
    """Loss quantities with a positive weight in ``loss`` or any stage, in :data:`LOSS_QUANTITIES` order."""
    return [
        q
        for q in LOSS_QUANTITIES
        if max(config.loss.get(q, 0.0), *(s.weights.get(q, 0.0) for s in config.stages)) > 0
    ]


def required_labels(config: TrainConfig) -> list[str]:
    """Schema keys of the labels the loss weights (``loss`` and every stage; the Fermi level, which may
    come from a head option, left out), in :data:`LOSS_QUANTITIES` order."""
    return [LABEL_OF[q] for q in _weighted(config) if q != "fermi_level"]


def direct_stages(config: TrainConfig) -> list[str]:
    """Names of the stages that train in ``direct`` SCF mode (and have epochs to train)."""
    return [s.name for s in config.stages if s.scf_mode == "direct" and s.epochs > 0]


def _head(config: TrainConfig) -> dict[str, Any]:
    head = config.model.get("head") or {}
    return head if isinstance(head, dict) else {}


def constant_mu_without_level(config: TrainConfig) -> bool:
    """A constant-μ head without the option ``fermi_level``: its μ is each structure's Fermi level."""
    head = _head(config)
    return head.get("ensemble") == "constant_mu" and head.get("fermi_level") is None


def fermi_level_uses(config: TrainConfig) -> list[str]:
    """What in ``config`` uses the Fermi level of the data (empty: nothing): a ``fermi_level`` loss
    weight, a constant-μ head, ``direct`` SCF training. Such a run must not mix Fermi levels measured
    from different references."""
    uses = []
    if "fermi_level" in _weighted(config):
        uses.append("the loss weight of fermi_level")
    if _head(config).get("ensemble") == "constant_mu":
        uses.append("the constant-μ head")
    direct = direct_stages(config)
    if direct:
        uses.append(f"'direct' training (stage(s) {direct})")
    return uses


@dataclass(frozen=True)
class LabelNeed:
    """A label without which a run stops before its first step (``emlip-train --check`` refuses it)."""

    #: Schema key of the label.
    key: str
    #: The key the data file holds it under (``data.keys``; the array of a column mapping).
    file_key: str
    #: What in the configuration needs it.
    reason: str
    #: Every training structure must carry it (else: at least one).
    every: bool = False


def label_needs(config: TrainConfig) -> list[LabelNeed]:
    """Every label ``config`` cannot train without, the single account of what the trainer's checks
    refuse data for: each label the loss weights (:func:`required_labels`: at least one training
    structure), and in every training structure the reference charges of ``direct`` SCF training, the
    Fermi level of a constant-μ head without the option ``fermi_level`` (its μ in every mode), and the
    reference charges and atomic dipoles that ``data.charges_from_dipoles`` moves."""

    def need(key: str, reason: str, every: bool = False) -> LabelNeed:
        spec = config.data.keys.get(key, key)
        return LabelNeed(key, spec if isinstance(spec, str) else str(spec["key"]), reason, every)

    needs = [need(LABEL_OF[q], f"the loss weight of {q}") for q in _weighted(config) if q != "fermi_level"]
    direct = direct_stages(config)
    if direct:
        needs.append(need(schema.CHARGES, f"'direct' training (stage(s) {direct})", every=True))
    if constant_mu_without_level(config):
        needs.append(need(schema.FERMI_LEVEL, "a constant-μ head without the option fermi_level", True))
    if config.data.charges_from_dipoles:
        for key in (schema.CHARGES, schema.ATOMIC_DIPOLES):
            needs.append(need(key, "data.charges_from_dipoles", every=True))
    if mean_charges_wanted(config.model):
        needs.append(need(schema.CHARGES, f"model.head.formal_charges {schema.MEAN_CHARGES!r}"))
    return needs


def _check_induction(values: Any) -> None:
    """The model's ``induction`` section: a mapping of :class:`InductionConfig` options."""
    from aiida_emlip.models.induction import InductionConfig

    if values is None:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"model.induction must be a mapping, got {type(values).__name__}")
    try:
        InductionConfig(**values)
    except TypeError as exc:
        known = sorted(f.name for f in dataclasses.fields(InductionConfig))
        raise ConfigError(f"model.induction: unknown option(s) in {sorted(values)}; known: {known}") from exc
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from exc


def check_key_mapping(key: str, value: Any) -> None:
    """A ``data.keys`` entry: a file key, or ``{key, columns, order}`` reading columns of a per-atom array.

    ``columns`` is one index (a per-atom scalar such as a charge) or three (an l = 1 vector); ``order``
    (three columns only) says which Cartesian component each column holds: ``xyz`` or e3nn's ``yzx``.
    """
    where = f"data.keys.{key}"
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a file key or a mapping {{key, columns, order}}, got {value!r}")
    unknown = sorted(set(value) - {"key", "columns", "order"})
    if unknown or not isinstance(value.get("key"), str):
        raise ConfigError(f"{where}: a column mapping needs 'key' (and 'columns', 'order'); got {value!r}")
    label = schema.label(key)
    if label.scope != "atom":
        raise ConfigError(f"{where}: column mappings read per-atom arrays; {key!r} is per structure")
    columns = value.get("columns")
    columns = [columns] if isinstance(columns, int) and not isinstance(columns, bool) else columns
    width = math.prod(label.shape) if label.shape else 1
    if not (
        isinstance(columns, list)
        and len(columns) == width
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in columns)
    ):
        raise ConfigError(f"{where}.columns must list {width} non-negative column index(es), got {columns!r}")
    order = value.get("order", "xyz")
    if width == 3 and order not in VECTOR_ORDERS:
        raise ConfigError(f"{where}.order must be one of {sorted(VECTOR_ORDERS)}, got {order!r}")
    if width != 3 and "order" in value:
        raise ConfigError(f"{where}.order applies to three-column (l = 1) mappings only")


def _check_weights(weights: dict[str, float], where: str) -> None:
    unknown = sorted(set(weights) - set(LOSS_QUANTITIES))
    if unknown:
        raise ConfigError(f"{where}: unknown loss quantity {unknown}; known: {list(LOSS_QUANTITIES)}")
    for key, value in weights.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative number, got {value!r}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` strictly; recurse into dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or 'the configuration'}; known: {sorted(known)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'configuration'}: {exc}") from None


def parse_config(values: dict[str, Any], base_dir: Path | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping; relative data and ``init_from`` paths are taken
    from ``base_dir``."""
    if not isinstance(values, dict):
        raise ConfigError("the configuration must be a YAML mapping")
    if "data" not in values:
        raise ConfigError("the configuration needs a 'data' section with at least 'train'")
    config = _build(TrainConfig, values, "")
    if base_dir is not None:
        for name in ("train", "valid", "test"):
            path = getattr(config.data, name)
            if path and not Path(path).is_absolute():
                setattr(config.data, name, str(base_dir / path))
        if config.init_from and not Path(config.init_from).is_absolute():
            config.init_from = str(base_dir / config.init_from)
    return config


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(values or {}, base_dir=path.resolve().parent)
