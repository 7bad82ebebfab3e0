"""Parameters of ``emlip-eval``: the mode and its options, parsed and checked before any compute.

One flat mapping (a YAML/JSON file, command-line flags, or the ``parameters`` Dict of the
``emlip.evaluate`` calculation)::

    mode: relax            # single_point (default) | relax | md
    device: auto           # auto (CUDA when available) | cpu | cuda
    kernels: e3nn          # e3nn | cueq (NVIDIA cuEquivariance for MACE's products, same results)
    optimizer: FIRE        # relax: FIRE | BFGS
    fmax: 0.05             # relax: eV/Å
    constraints: {fixed_indices: [0, 1], z_max: 2.0}

Keys of another mode are an error, so that a parameter cannot be silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms

from aiida_emlip.training.errors import ConfigError, DataError

MODES = ("single_point", "relax", "md")
OPTIMIZERS = ("FIRE", "BFGS")
ENSEMBLES = ("nve", "langevin")
DEVICES = ("auto", "cpu", "cuda")
KERNELS = ("e3nn", "cueq")  # as aiida_emlip.models.backbone.KERNELS

COMMON_KEYS = ("mode", "device", "batch_size", "kernels")
RELAX_KEYS = ("optimizer", "fmax", "max_steps", "relax_cell", "trajectory_stride")
MD_KEYS = ("ensemble", "timestep_fs", "steps", "temperature_K", "friction", "trajectory_stride", "seed")
CONSTRAINT_KEYS = ("fixed_indices", "z_min", "z_max")
MODE_KEYS = {"single_point": (), "relax": (*RELAX_KEYS, "constraints"), "md": (*MD_KEYS, "constraints")}


@dataclass(frozen=True)
class Constraints:
    """Atoms held fixed during relax and md: by index, and/or every atom with z_min ≤ z ≤ z_max (Å)."""

    fixed_indices: tuple[int, ...] = ()
    z_min: float | None = None
    z_max: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.fixed_indices) or self.z_min is not None or self.z_max is not None

    def fixed_atoms(self, atoms: Atoms, where: str = "structure") -> list[int]:
        """Sorted indices of the fixed atoms of ``atoms``; an index beyond the structure is an error."""
        fixed = set()
        for index in self.fixed_indices:
            if index >= len(atoms):
                raise DataError(
                    f"{where}: constraints.fixed_indices holds {index}, but it has {len(atoms)} atoms"
                )
            fixed.add(index)
        if self.z_min is not None or self.z_max is not None:
            z = atoms.positions[:, 2]
            low = -np.inf if self.z_min is None else self.z_min
            high = np.inf if self.z_max is None else self.z_max
            fixed.update(int(i) for i in np.flatnonzero((z >= low) & (z <= high)))
        return sorted(fixed)


@dataclass(frozen=True)
class RelaxOptions:
    """ASE optimiser settings; ``relax_cell`` relaxes the cell too (FrechetCellFilter)."""

    optimizer: str = "FIRE"
    fmax: float = 0.05  # eV/Å (and eV/Å of the filter's cell degrees of freedom)
    max_steps: int = 200
    relax_cell: bool = False
    trajectory_stride: int = 0  # write every n-th step (and the last) to the trajectory; 0: none


@dataclass(frozen=True)
class MDOptions:
    """Molecular dynamics from Maxwell–Boltzmann velocities at ``temperature_K``."""

    ensemble: str = "nve"
    timestep_fs: float = 0.5
    steps: int = 100
    temperature_K: float = 300.0  # initial velocities; Langevin's target
    friction: float = 0.01  # 1/fs (Langevin)
    trajectory_stride: int = 10
    seed: int = 0


@dataclass(frozen=True)
class EvalParameters:
    """Everything ``emlip-eval`` needs besides the model and structure files."""

    mode: str = "single_point"
    device: str = "auto"
    batch_size: int = 16
    relax: RelaxOptions | None = None
    md: MDOptions | None = None
    constraints: Constraints = field(default_factory=Constraints)
    kernels: str = "e3nn"

    def to_dict(self) -> dict[str, Any]:
        """The resolved flat mapping (every default filled in), as recorded in the summary."""
        values: dict[str, Any] = {"mode": self.mode, "device": self.device, "kernels": self.kernels}
        if self.mode == "single_point":
            values["batch_size"] = self.batch_size
        options = self.relax if self.mode == "relax" else self.md
        if options is not None:
            values.update(asdict(options))
            values["constraints"] = {
                "fixed_indices": list(self.constraints.fixed_indices),
                "z_min": self.constraints.z_min,
                "z_max": self.constraints.z_max,
            }
        return values


def _number(key: str, value: Any, positive: bool = False, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"parameter {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"parameter {key!r} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"parameter {key!r} must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"parameter {key!r} must be at least {minimum:g}, got {value!r}")
    return value


def _integer(key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"parameter {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"parameter {key!r} must be at least {minimum}, got {value!r}")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...], upper: bool = False) -> str:
    text = str(value).upper() if upper else str(value).lower()
    if not isinstance(value, str) or text not in allowed:
        raise ConfigError(f"parameter {key!r} must be one of {', '.join(allowed)}, got {value!r}")
    return text


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"parameter {key!r} must be true or false, got {value!r}")
    return value


def _constraints(value: Any) -> Constraints:
    if value is None:
        return Constraints()
    if not isinstance(value, Mapping):
        raise ConfigError(f"parameter 'constraints' must be a mapping of {CONSTRAINT_KEYS}, got {value!r}")
    unknown = sorted(set(value) - set(CONSTRAINT_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in 'constraints'; known: {list(CONSTRAINT_KEYS)}")
    indices = value.get("fixed_indices") or []
    if not isinstance(indices, (list, tuple)):
        raise ConfigError(f"constraints.fixed_indices must be a list of atom indices, got {indices!r}")
    fixed = tuple(sorted({_integer("constraints.fixed_indices", i) for i in indices}))
    z_min, z_max = value.get("z_min"), value.get("z_max")
    z_min = None if z_min is None else _number("constraints.z_min", z_min)
    z_max = None if z_max is None else _number("constraints.z_max", z_max)
    if z_min is not None and z_max is not None and z_min > z_max:
        raise ConfigError(f"constraints: z_min ({z_min:g}) is above z_max ({z_max:g})")
    return Constraints(fixed, z_min, z_max)


def parse_parameters(values: Mapping[str, Any] | None) -> EvalParameters:
    """Check ``values`` (the flat mapping above) and fill in defaults; :class:`ConfigError` otherwise."""
    values = dict(values or {})
    mode = values.get("mode", "single_point")
    if mode not in MODES:
        raise ConfigError(f"parameter 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    allowed = {*COMMON_KEYS, *MODE_KEYS[mode]}
    for key in sorted(set(values) - allowed):
        owners = [m for m, keys in MODE_KEYS.items() if key in keys]
        if owners:
            raise ConfigError(f"parameter {key!r} applies to mode {' and '.join(owners)}, not {mode}")
        raise ConfigError(f"unknown parameter {key!r}; known for mode {mode}: {sorted(allowed)}")
    device = _choice("device", values.get("device", "auto"), DEVICES)
    batch_size = _integer("batch_size", values.get("batch_size", 16), minimum=1)
    kernels = _choice("kernels", values.get("kernels", "e3nn"), KERNELS)
    if mode == "single_point":
        return EvalParameters(mode, device, batch_size, kernels=kernels)
    constraints = _constraints(values.get("constraints"))
    if mode == "relax":
        d = RelaxOptions()
        relax = RelaxOptions(
            optimizer=_choice("optimizer", values.get("optimizer", d.optimizer), OPTIMIZERS, upper=True),
            fmax=_number("fmax", values.get("fmax", d.fmax), positive=True),
            max_steps=_integer("max_steps", values.get("max_steps", d.max_steps)),
            relax_cell=_boolean("relax_cell", values.get("relax_cell", d.relax_cell)),
            trajectory_stride=_integer(
                "trajectory_stride", values.get("trajectory_stride", d.trajectory_stride)
            ),
        )
        return EvalParameters(mode, device, batch_size, relax=relax, constraints=constraints, kernels=kernels)
    d = MDOptions()
    md = MDOptions(
        ensemble=_choice("ensemble", values.get("ensemble", d.ensemble), ENSEMBLES),
        timestep_fs=_number("timestep_fs", values.get("timestep_fs", d.timestep_fs), positive=True),
        steps=_integer("steps", values.get("steps", d.steps), minimum=1),
        temperature_K=_number("temperature_K", values.get("temperature_K", d.temperature_K), minimum=0.0),
        friction=_number("friction", values.get("friction", d.friction), minimum=0.0),
        trajectory_stride=_integer("trajectory_stride", values.get("trajectory_stride", d.trajectory_stride)),
        seed=_integer("seed", values.get("seed", d.seed)),
    )
    if md.ensemble == "langevin" and md.friction <= 0:
        raise ConfigError("parameter 'friction' must be positive for the langevin ensemble (1/fs)")
    return EvalParameters(mode, device, batch_size, md=md, constraints=constraints, kernels=kernels)


def load_parameters(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON parameter file into a mapping (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping, got {type(values).__name__}")
    return values
