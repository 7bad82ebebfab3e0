"""The training loop: stages, EMA, clipping, early stopping, checkpoints, signals, NaN guard, DDP."""

from __future__ import annotations

import csv
import io
import json
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from aiida_emlip import schema
from aiida_emlip.models.io import ModelFileError, resolve_device, serialize_model
from aiida_emlip.models.model import DTYPES, EmlipModel, ModelConfig, model_capabilities
from aiida_emlip.training import distributed
from aiida_emlip.training.atomic import write_bytes_atomic, write_text_atomic
from aiida_emlip.training.base_charges import resolve_mean_charges
from aiida_emlip.training.config import (
    AUTO_MULTIPOLE_WEIGHTS,
    LABEL_OF,
    LOSS_QUANTITIES,
    TrainConfig,
    constant_mu_without_level,
    direct_stages,
    fermi_level_uses,
    required_labels,
)
from aiida_emlip.training.data import (
    Sample,
    attach_graphs,
    batches,
    collate,
    elements_of,
    fit_reference_energies,
    load_samples,
    split,
)
from aiida_emlip.training.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DataWarning,
    Interrupted,
    NonFiniteError,
)
from aiida_emlip.training.identity import data_digests, run_identity
from aiida_emlip.training.losses import ErrorTable, format_table, loss_terms, predict, total_loss
from aiida_emlip.training.progress import Progress
from aiida_emlip.training.resume import restore
from aiida_emlip.training.state import CHECKPOINT_FORMAT, Ema, rng_state, save_checkpoint, seed_everything
from aiida_emlip.training.warmstart import (
    check_architecture,
    check_new_elements,
    load_init_weights,
    read_init_model,
)

SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)


@dataclass
class Position:
    """Where training stands; saved in checkpoints."""

    stage: int = 0
    epoch_in_stage: int = 0
    epoch: int = 0  # global epoch counter
    step: int = 0  # next step within the current epoch
    train_sum: float = 0.0  # running sum of the epoch's training losses
    train_count: int = 0
    best: float = float("inf")  # best validation loss within the stage (early stopping)
    bad_epochs: int = 0
    stage_started: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Factor between the learning rates in use and the configured ones (``--lr-scale``).
    lr_scale: float = 1.0


class Trainer:
    """Set up from a :class:`TrainConfig` (all input checks happen here), then :meth:`run`."""

    def __init__(
        self, config: TrainConfig, output_dir: str | Path | None = None, device: str | None = None
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir or config.output_dir)
        requested = device or config.device
        try:
            self.device = resolve_device(requested)
        except ModelFileError as exc:
            raise ConfigError(str(exc)) from None
        self.world = distributed.init(self.device.type)
        if self.world.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.progress = Progress(config.progress, enabled=self.world.is_main)
        self.after_step: Callable[[Trainer], None] | None = None  # test hook
        #: Where the resolved configuration is copied (``None``: not copied, e.g. it is the input file).
        self.config_copy: Path | None = self.output_dir / "config.yaml"
        #: Lines logged (to the terminal and train.log) when the run starts.
        self.notes: list[str] = []
        #: Set by :meth:`load` when the checkpoint's run is finished and has no epoch left to train.
        self.nothing_to_train: str | None = None
        self._resumed = False
        self._init_note: str | None = None  # the log line of a warm start (init_from)
        self._stop_signal: int | None = None
        self._start = time.perf_counter()
        seed_everything(config.seed)  # model initialisation is reproducible from the seed
        self._load_data()
        self._build_model()
        self._build_optimizer()
        self.pos = Position()

    # ------------------------------------------------------------------------------------ setup
    def _load_data(self) -> None:
        cfg = self.config
        data = cfg.data
        required = required_labels(cfg)
        samples = load_samples(data.train, data)
        valid = load_samples(data.valid, data) if data.valid else []
        test = load_samples(data.test, data) if data.test else []
        fractions = [0.0 if data.valid else data.valid_fraction, 0.0 if data.test else data.test_fraction]
        split_valid, split_test, train = split(samples, fractions, cfg.seed)
        self.data_sha256 = data_digests(data)
        self.train = train
        self.valid = valid or split_valid
        self.test = test or split_test
        if not self.train:
            raise DataError(f"{data.train}: no structures left for training after the validation/test split")
        self._check_fermi_references()
        self._check_fermi_level_weight()
        for key in required:
            if not any(key in s.labels for s in self.train):
                raise DataError(
                    f"the loss weights a quantity whose label {key!r} no training structure has "
                    f"(file key {data.keys.get(key, key)!r}); add the label, map it with data.keys, "
                    f"or set its weight to 0"
                )

    def _check_fermi_references(self) -> None:
        """A run that uses the Fermi level (a weighted ``fermi_level`` loss, a constant-μ head, ``direct``
        SCF training) must not mix Fermi levels measured from different references."""
        uses = fermi_level_uses(self.config)
        counts = Counter(s.fermi_reference for s in self.train + self.valid + self.test if s.fermi_reference)
        if uses and len(counts) > 1:
            found = ", ".join(f"{ref} ({n} structure(s))" for ref, n in sorted(counts.items()))
            raise DataError(
                f"the data mix Fermi levels measured from different references: {found}; a run that uses "
                "the Fermi level must train on one reference (see fermi_reference in the dataset "
                "documentation): select the structures of one, or set the loss weight of fermi_level to 0"
            )

    def _check_fermi_level_weight(self) -> None:
        """A ``fermi_level`` loss weight on data none of whose training structures has a Fermi level: the
        term is zero throughout, which is said (a warning: the Fermi level is not required of data)."""
        if "the loss weight of fermi_level" not in fermi_level_uses(self.config):
            return
        if any(schema.FERMI_LEVEL in s.atoms.info for s in self.train):
            return
        key = self.config.data.keys.get(schema.FERMI_LEVEL, schema.FERMI_LEVEL)
        warnings.warn(
            f"the loss weights fermi_level but no training structure has a Fermi level (looked for {key!r} "
            "in atoms.info; map it with data.keys): that term of the loss is zero",
            DataWarning,
            stacklevel=2,
        )

    def _check_total_charges(self) -> None:
        """A head that uses the total charge, on data none of which gives one: every structure is taken
        as neutral, which is rarely meant (a warning, not an error: neutral data need not say so)."""
        head = self.model.head
        everything = self.train + self.valid + self.test
        if head.charge_control == "none" or any(schema.TOTAL_CHARGE in s.atoms.info for s in everything):
            return
        key = self.config.data.keys.get(schema.TOTAL_CHARGE, schema.TOTAL_CHARGE)
        warnings.warn(
            f"no structure of the data has a total charge (looked for {key!r} in atoms.info; map it with "
            f"data.keys): the '{head.name}' head takes every structure as neutral",
            DataWarning,
            stacklevel=2,
        )

    def _build_model(self) -> None:
        cfg = self.config
        values = dict(cfg.model)
        everything = self.train + self.valid + self.test
        present = elements_of(everything)
        init = self.init_model = read_init_model(cfg.init_from) if cfg.init_from else None
        if init is not None:
            check_new_elements(init, present)
        values.setdefault("elements", init.elements if init is not None else present)
        init_charges = init.config.get("head", {}).get("formal_charges") if init is not None else None
        values = resolve_mean_charges(values, self.train, present, init_charges)
        try:
            model_config = ModelConfig.from_dict(values)
            self.model = EmlipModel(model_config)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model: {exc}") from None
        unknown = sorted(set(present) - set(model_config.elements))
        if unknown:
            raise DataError(
                f"the data contain elements {unknown} missing from model.elements {model_config.elements}"
            )
        self.dtype = DTYPES[model_config.dtype]
        ref = cfg.data.reference_energies
        if init is not None:
            check_architecture(init, model_config.to_dict())
            load_init_weights(self.model, init)
            self._init_note = (
                f"warm start: weights and reference energies from {init.path} (sha256 {init.sha256[:12]}…); "
                "optimizer, scheduler and EMA start fresh"
            )
            self.notes.append(self._init_note)
        if init is not None and ref == "fit":
            e0 = self.model.reference_energies.detach().cpu().double().numpy()  # the initial model's
        elif ref == "fit":
            e0 = fit_reference_energies(self.train, model_config.elements)
        else:
            missing = sorted(set(model_config.elements) - set(ref))
            if missing:
                raise ConfigError(f"data.reference_energies lacks element(s) {missing}")
            e0 = np.array([ref[e] for e in model_config.elements], dtype=float)
        self.reference_energies = {e: float(v) for e, v in zip(model_config.elements, e0)}
        self.model.reference_energies.copy_(torch.as_tensor(e0, dtype=self.dtype))
        for samples in (self.train, self.valid, self.test):
            attach_graphs(samples, self.model.cutoff)
        self.model.to(self.device)
        self._resolve_multipoles()
        self._check_stage_labels()
        self._check_formal_charges()
        self._check_total_charges()

    def _resolve_multipoles(self) -> None:
        """``multipoles: auto``: supervise the head's charges/dipoles on the data's DFT multipoles."""
        cfg = self.config
        self.auto_weights: dict[str, float] = {}
        head = self.model.head
        if cfg.multipoles == "off" or not head.learns_multipoles:
            return
        capabilities = model_capabilities(self.model.config.to_dict())
        named = set(cfg.loss) | {q for stage in cfg.stages for q in stage.weights}
        for quantity, weight in AUTO_MULTIPOLE_WEIGHTS.items():
            if quantity in named or quantity not in capabilities:
                continue
            if any(LABEL_OF[quantity] in s.labels for s in self.train):
                self.auto_weights[quantity] = weight

    def _check_formal_charges(self) -> None:
        """A formal-charge head (``fixed``) must sum to the total charge of every structure of every
        split: checked before the first epoch, so that ``--check`` refuses what the run would."""
        head = self.model.head
        if head.charge_control != "formal":
            return
        table = dict(zip(self.model.config.elements, head.formal.double().tolist()))
        for part, samples in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            for sample in samples:
                total = sum(table[symbol] for symbol in sample.atoms.get_chemical_symbols())
                if abs(total - sample.total_charge) > 1e-6 * max(1, len(sample.atoms)):
                    raise DataError(
                        f"structure {sample.index} (in the {part} split): formal charges sum to {total:+g} e "
                        f"but its total charge is {sample.total_charge:+g} e; the '{head.name}' head cannot "
                        "represent it"
                    )

    def _check_stage_labels(self) -> None:
        """Labels that a stage's SCF training mode or the head needs, checked before the first epoch (and
        --check): the reference charges of ``direct`` training, and the Fermi level of every structure of
        every split for a constant-μ head without the option ``fermi_level`` (its μ in any mode)."""
        direct = direct_stages(self.config)
        missing = [s.index for s in self.train if schema.CHARGES not in s.labels] if direct else []
        if missing:
            raise DataError(
                f"stage(s) {direct} train in 'direct' mode, which needs per-atom reference charges "
                f"({schema.CHARGES!r}) in every training structure; {len(missing)} lack them "
                f"(first: structure {missing[0]})"
            )
        if not constant_mu_without_level(self.config):
            return
        for part, samples in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            without = [s.index for s in samples if schema.FERMI_LEVEL not in s.atoms.info]
            if without:
                raise DataError(
                    "a constant-μ head without the option fermi_level takes each structure's chemical "
                    f"potential from its Fermi level; {len(without)} structure(s) of the {part} split lack "
                    f"'{schema.FERMI_LEVEL}' (first: structure {without[0]}); label them or set the head "
                    "option fermi_level"
                )

    def weights(self, stage: int) -> dict[str, float]:
        """Loss weights of ``stage``: the config's, plus the automatic multipole weights."""
        return {**self.config.weights_at_stage(stage), **self.auto_weights}

    def _build_optimizer(self) -> None:
        cfg = self.config
        opt = cfg.optimizer
        cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        #: The model's parameters, listed once (walking the module tree every step costs time).
        self._params = list(self.model.parameters())
        self.optimizer = cls(
            self._params,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            amsgrad=opt.amsgrad,
            foreach=self.foreach,
        )
        sch = cfg.scheduler
        if sch.name == "cosine":
            self.scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(cfg.total_epochs, 1), eta_min=sch.min_lr
            )
        elif sch.name == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=sch.factor, patience=sch.patience, min_lr=sch.min_lr
            )
        elif sch.name == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(
                self.optimizer, step_size=sch.step_size, gamma=sch.factor
            )
        else:
            self.scheduler = None
        self.ema = Ema(self.model, cfg.ema.decay) if cfg.ema.enabled else None

    @property
    def foreach(self) -> bool | None:
        """The optimizer and gradient clipping on all parameters at once (``foreach``) on the CPU too,
        where torch's default is one parameter at a time: the same numbers, fewer calls. ``None``
        elsewhere: torch's default (``foreach`` on CUDA; not every device has the kernels)."""
        return True if self.device.type == "cpu" else None

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / self.config.checkpoint.file

    def identity(self) -> dict[str, Any]:
        """What this run's checkpoints belong to (see :mod:`aiida_emlip.training.identity`)."""
        init = self.init_model
        return run_identity(self.config.to_dict(), self.data_sha256, init.sha256 if init else None)

    def state_dict(self) -> dict[str, Any]:
        pos = self.pos
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity(),
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": rng_state(),
            "position": {k: getattr(pos, k) for k in Position.__dataclass_fields__},
        }

    def set_lr_scale(self, scale: float) -> None:
        """Train at ``scale`` times the configured learning rates (``--lr-scale``) from where the run is.

        The optimizer's rates and the scheduler's base rates are multiplied by ``scale`` over the current
        factor, so the schedule goes on from the scaled rate; a stage that sets ``lr`` starts at
        ``scale`` times it. The factor is saved in checkpoints and is not part of the run's identity.
        """
        factor = scale / self.pos.lr_scale
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            if self.scheduler is not None:
                if hasattr(self.scheduler, "base_lrs"):
                    self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
                if hasattr(self.scheduler, "_last_lr"):
                    self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            self.notes.append(
                f"learning rates at {scale:g} times the configured ones "
                f"(--lr-scale; was {self.pos.lr_scale:g})"
            )
        self.pos.lr_scale = scale

    def save(self) -> None:
        if self.world.is_main:
            save_checkpoint(self.checkpoint_path, self.state_dict())

    def load(self, path: str | Path) -> None:
        """Restore everything needed to continue bit-for-bit from ``path``, after checking it is this run's.

        The checkpoint must match the data, seed and schedule; only the epochs of the last stage may
        differ. A finished run given more epochs continues its last stage (see :mod:`.resume`).
        """
        restore(self, Path(path))
        self._resumed = True
        if self._init_note in self.notes:  # the checkpoint's weights replace those of the initial model
            self.notes[self.notes.index(self._init_note)] = (
                f"warm start from {self.init_model.path}: the checkpoint continues that run "
                "(it began from the same model file)"
            )

    # ------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train all stages; write the model, metrics and curves; return the metrics."""
        if resume is not None:
            self.load(resume)
        elif not self._resumed:
            seed_everything(self.config.seed)
        if self.nothing_to_train:
            raise CheckpointError(self.nothing_to_train)
        if self.world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.config_copy is not None:
                write_text_atomic(self.config_copy, yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            self.progress.logfile = self.output_dir / "train.log"
        for note in self.notes:
            self.progress.log(note)
        previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        start = self._start = time.perf_counter()
        try:
            self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        elapsed = time.perf_counter() - start
        metrics = self._finish(elapsed)
        distributed.shutdown(self.world)
        return metrics

    def _loop(self) -> None:
        cfg = self.config
        pos = self.pos
        self.progress.log(
            f"training on {self.device} (world size {self.world.size}): {len(self.train)} train, "
            f"{len(self.valid)} valid, {len(self.test)} test structures; "
            f"elements {self.model.config.elements}"
        )
        if self.auto_weights:
            self.progress.log(
                "multipole supervision (multipoles: auto): "
                + ", ".join(f"{q} weight {w:g}" for q, w in self.auto_weights.items())
            )
        while pos.stage < len(cfg.stages):
            stage = cfg.stages[pos.stage]
            if not pos.stage_started:
                pos.stage_started = True
                pos.best, pos.bad_epochs = float("inf"), 0
                if stage.lr is not None:
                    for group in self.optimizer.param_groups:
                        group["lr"] = stage.lr * pos.lr_scale
                mode = f", scf_mode {stage.scf_mode}" if self._self_consistent() else ""
                self.progress.log(f"stage {pos.stage} '{stage.name}': {stage.epochs} epochs{mode}")
            if pos.epoch_in_stage >= stage.epochs:
                pos.stage += 1
                pos.epoch_in_stage = 0
                pos.stage_started = False
                continue
            self._epoch(stage.scf_mode, self.weights(pos.stage))
            stop_early = self._end_epoch(stage.scf_mode, self.weights(pos.stage))
            pos.epoch += 1
            pos.epoch_in_stage = stage.epochs if stop_early else pos.epoch_in_stage + 1
            pos.step, pos.train_sum, pos.train_count = 0, 0.0, 0
            every = cfg.checkpoint.every
            if every and pos.epoch % every == 0:
                self.save()

    def _epoch(self, scf_mode: str, weights: dict[str, float]) -> None:
        cfg, pos, world = self.config, self.pos, self.world
        n_batches = (len(self.train) + cfg.data.batch_size - 1) // cfg.data.batch_size
        steps = (n_batches + world.size - 1) // world.size
        order = torch.randperm(
            len(self.train), generator=torch.Generator().manual_seed(cfg.seed * 100003 + pos.epoch)
        )
        need = {q for q, w in weights.items() if w > 0}
        self.model.train()
        while pos.step < steps:
            index = pos.step * world.size + world.rank
            has_batch = index < n_batches
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            if has_batch:
                chosen = order[index * cfg.data.batch_size : (index + 1) * cfg.data.batch_size].tolist()
                batch = collate([self.train[i] for i in chosen], self.dtype).to(self.device)
                out = predict(self.model, batch, need, scf_mode, training=True)
                terms = loss_terms(out, batch, weights)
                loss = total_loss(terms, weights, out["energy"])
                bad = not bool(torch.isfinite(loss))
                if distributed.any_rank(world, bad, self.device):
                    raise NonFiniteError(self._nan_message("loss", {k: float(v) for k, v in terms.items()}))
                if loss.requires_grad:
                    loss.backward()
                loss_value = float(loss.detach())
            elif distributed.any_rank(world, False, self.device):
                raise NonFiniteError(self._nan_message("loss", {}))
            distributed.average_gradients(world, self.model, has_batch)
            self._check_and_clip_gradients()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            pos.train_sum += loss_value
            pos.train_count += int(has_batch)
            self.progress.step(pos.epoch, pos.step, steps, loss_value)
            pos.step += 1
            if self.after_step is not None:
                self.after_step(self)
            if distributed.any_rank(world, self._stop_signal is not None, self.device):
                self.save()
                raise Interrupted(
                    f"signal {self._stop_signal} received at epoch {pos.epoch}, step {pos.step}: "
                    f"checkpoint written to {self.checkpoint_path}; "
                    f"continue with --resume {self.checkpoint_path}"
                )

    def _check_and_clip_gradients(self) -> None:
        """Refuse non-finite gradients (:class:`NonFiniteError`), then clip their norm (``clip_grad_norm``).

        One reduction serves both: the total norm of finite gradients is finite unless it overflows, and
        only a non-finite norm calls for a look at each gradient (an overflow is let through, clipped as
        before). Without the helpers of torch ≥ 2.6 each gradient is checked, then clipped.
        """
        params = [p for p in self._params if p.grad is not None]
        grads = [p.grad for p in params]
        max_norm = self.config.clip_grad_norm
        get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
        if get_total_norm is None or not grads:
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                raise NonFiniteError(self._nan_message("gradient", {}))
            if max_norm:
                torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.foreach)
            return
        total = get_total_norm(grads, foreach=self.foreach)
        if not bool(torch.isfinite(total)) and not all(bool(torch.isfinite(g).all()) for g in grads):
            raise NonFiniteError(self._nan_message("gradient", {}))
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=self.foreach)

    def _nan_message(self, what: str, terms: dict[str, float]) -> str:
        return (
            f"non-finite {what} at epoch {self.pos.epoch}, step {self.pos.step} {terms or ''}: stopping. "
            f"Check the data for NaN/inf or lower optimizer.lr; "
            f"the last checkpoint (if any) is {self.checkpoint_path}"
        )

    def evaluate(
        self, samples: list[Sample], scf_mode: str, quantities: list[str]
    ) -> tuple[ErrorTable, dict]:
        """Errors of the (EMA) model on ``samples``; also gathers SCF convergence statistics."""
        table = ErrorTable()
        scf = {"structures": 0, "converged": 0, "iterations": 0.0}
        need = set(quantities)
        self.model.eval()
        if self.ema is not None:
            self.ema.swap(self.model)
        try:
            share = samples[self.world.rank :: self.world.size]
            for batch in batches(share, self.config.data.valid_batch_size, self.dtype):
                batch = batch.to(self.device)
                out = predict(self.model, batch, need, scf_mode, training=False)
                table.add(out, batch, quantities)
                if out.get("converged") is not None:
                    scf["structures"] += int(out["converged"].numel())
                    scf["converged"] += int(out["converged"].sum())
                    scf["iterations"] += float(out["iterations"].double().sum())
        finally:
            if self.ema is not None:
                self.ema.swap(self.model)
        if self.world.active:
            table = self._gather_table(table)
        return table, scf

    def _gather_table(self, table: ErrorTable) -> ErrorTable:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world.size
        dist.all_gather_object(gathered, table.raw())
        merged = ErrorTable()
        for part in gathered:
            merged.merge_from(part)
        return merged

    def _valid_loss(self, table: ErrorTable, weights: dict[str, float]) -> float:
        loss = 0.0
        for quantity, weight in weights.items():
            key = (quantity, "all")
            if weight > 0 and table.n.get(key):
                loss += weight * table.sq[key] / table.n[key]
        return loss

    def _end_epoch(self, scf_mode: str, weights: dict[str, float]) -> bool:
        """Validate, step the scheduler, log, and decide on early stopping."""
        pos, cfg = self.pos, self.config
        quantities = [q for q in LOSS_QUANTITIES if weights.get(q, 0) > 0]
        valid_source = self.valid or self.train
        table, _ = self.evaluate(valid_source, scf_mode, quantities)
        valid_loss = self._valid_loss(table, weights)
        if not np.isfinite(valid_loss):
            raise NonFiniteError(self._nan_message("validation loss", {}))
        train_loss = pos.train_sum / max(pos.train_count, 1)
        if self.world.active:
            sums = distributed.all_sum(
                self.world, torch.tensor([pos.train_sum, float(pos.train_count)], dtype=torch.float64)
            )
            train_loss = float(sums[0] / sums[1].clamp(min=1))
        lr = self.optimizer.param_groups[0]["lr"]
        summary = table.summary()
        row: dict[str, Any] = {
            "epoch": pos.epoch + 1,
            "stage": cfg.stages[pos.stage].name,
            "scf_mode": scf_mode,
            "lr": lr,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "elapsed_s": time.perf_counter() - self._start,
        }
        for quantity in LOSS_QUANTITIES:
            row[f"valid_rmse_{quantity}"] = summary.get(quantity, {}).get("all", {}).get("rmse", float("nan"))
        pos.history.append(row)
        mode = f", {scf_mode}" if self._self_consistent() else ""
        self.progress.log(
            f"epoch {pos.epoch + 1} ({row['stage']}{mode}) "
            f"train {train_loss:.5g} valid {valid_loss:.5g} lr {lr:.3g}"
        )
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(valid_loss)
        elif self.scheduler is not None:
            self.scheduler.step()
        es = cfg.early_stopping
        if valid_loss < pos.best - es.min_delta:
            pos.best, pos.bad_epochs = valid_loss, 0
        else:
            pos.bad_epochs += 1
        if es.patience and pos.bad_epochs >= es.patience:
            self.progress.log(f"early stopping: no improvement for {es.patience} epochs; ending the stage")
            return True
        return False

    # ----------------------------------------------------------------------------------- finish
    def _finish(self, elapsed: float) -> dict[str, Any]:
        cfg = self.config
        labelled = {k for s in self.train + self.valid + self.test for k in s.labels}
        quantities = [q for q in LOSS_QUANTITIES if LABEL_OF[q] in labelled]
        final_mode = cfg.stages[-1].scf_mode
        valid_source = self.valid or self.train
        valid_table, _ = self.evaluate(valid_source, "converge", quantities)
        test_table, scf = (
            self.evaluate(self.test, "converge", quantities) if self.test else (ErrorTable(), {})
        )
        drift = self.scf_drift(valid_source, final_mode)
        steps = sum(1 for _ in range(0, len(self.train), cfg.data.batch_size))
        metrics = {
            "elements": self.model.config.elements,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "reference_energies": self.reference_energies,
            "sizes": {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)},
            "epochs": self.pos.epoch,
            "lr_scale": self.pos.lr_scale,
            "device": str(self.device),
            "world_size": self.world.size,
            "wall_time_s": elapsed,
            "train_structures_per_s": len(self.train) * self.pos.epoch / elapsed if elapsed > 0 else None,
            "steps_per_epoch": steps,
            "cuda_max_memory_mb": (
                torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
            ),
            "valid": valid_table.summary(),
            "test": test_table.summary(),
            "scf": {"test_convergence": _convergence_summary(scf), "drift": drift},
            "loss_weights": {
                stage.name: {q: w for q, w in self.weights(i).items() if w > 0}
                for i, stage in enumerate(cfg.stages)
            },
            "auto_multipole_weights": self.auto_weights,
            "init_from": self.init_model.record() if self.init_model is not None else None,
            "history": self.pos.history,
        }
        if self.world.is_main:
            self._write_outputs(metrics, test_table)
        return metrics

    def _self_consistent(self) -> bool:
        """Whether the head iterates (only then does a stage's ``scf_mode`` mean anything)."""
        head = self.model.config.head
        name = head.get("name") if isinstance(head, dict) else getattr(head, "name", None)
        return name == "scf"

    def scf_drift(self, samples: list[Sample], trained_mode: str) -> dict[str, Any] | None:
        """How far the converged density (inference, from the local guess) is from the trained one.

        Compares charges and Fermi levels of ``converge`` with those of ``trained_mode`` (and with the
        reference charges when the data have them). ``None`` for heads that do not iterate.
        """
        if not samples:
            return None
        self.model.eval()
        if self.ema is not None:
            self.ema.swap(self.model)
        try:
            batch = collate(samples[: self.config.data.valid_batch_size], self.dtype).to(self.device)
            conv = predict(self.model, batch, set(), "converge", training=False)
            if conv.get("converged") is None:
                return None
            trained = predict(self.model, batch, set(), trained_mode, training=False)
        finally:
            if self.ema is not None:
                self.ema.swap(self.model)
        result: dict[str, Any] = {
            "trained_mode": trained_mode,
            "converged_fraction": float(conv["converged"].double().mean()),
            "mean_iterations": float(conv["iterations"].double().mean()),
        }
        if conv["charges"] is not None and trained["charges"] is not None:
            diff = (conv["charges"] - trained["charges"]).detach()
            result["charges_rms_drift"] = float(diff.pow(2).mean().sqrt())
            result["charges_max_drift"] = float(diff.abs().max())
        if schema.CHARGES in batch.labels and conv["charges"] is not None:
            mask = batch.masks[schema.CHARGES][batch.graph.batch]
            diff = (conv["charges"] - batch.labels[schema.CHARGES]).detach()[mask]
            result["charges_rmse_vs_reference"] = float(diff.pow(2).mean().sqrt()) if diff.numel() else None
        if conv["fermi_level"] is not None and trained["fermi_level"] is not None:
            result["fermi_level_max_drift"] = float(
                (conv["fermi_level"] - trained["fermi_level"]).abs().max()
            )
        return result

    def _write_outputs(self, metrics: dict[str, Any], test_table: ErrorTable) -> None:
        out = self.output_dir
        model_path = out / "model.safetensors"
        if self.ema is not None:
            self.ema.swap(self.model)
        try:
            extra: dict[str, Any] = {"training": {"epochs": self.pos.epoch, "seed": self.config.seed}}
            if self.init_model is not None:
                record = self.init_model.record()
                extra["training"]["init_from"] = {k: record[k] for k in ("sha256", "weights_sha256")}
            model_bytes = serialize_model(self.model, extra=extra)
        finally:
            if self.ema is not None:
                self.ema.swap(self.model)
        table = (
            format_table(
                test_table.summary(),
                "test-set errors (scf_mode converge)" if self._self_consistent() else "test-set errors",
            )
            if self.test
            else "no test split"
        )
        # the checkpoint last: a run killed while writing these resumes and writes them again
        write_bytes_atomic(model_path, model_bytes)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
        if self.pos.history:
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=list(self.pos.history[0]))
            writer.writeheader()
            writer.writerows(self.pos.history)
            write_text_atomic(out / "learning_curve.csv", text.getvalue())
        write_text_atomic(out / "test_errors.txt", table + "\n")
        self.save()
        self.progress.log(f"wrote {model_path}, metrics.json, learning_curve.csv")
        self.progress.log(table)


def _convergence_summary(scf: dict[str, Any]) -> dict[str, Any]:
    """SCF statistics of the test split: structures, converged, total and mean iterations (named so)."""
    if not scf or not scf.get("structures"):
        return {}
    return {
        "structures": scf["structures"],
        "converged": scf["converged"],
        "iterations_total": scf["iterations"],
        "iterations_mean": scf["iterations"] / scf["structures"],
    }
