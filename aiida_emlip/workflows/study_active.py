"""The study's active-learning rounds: MD with the model, the most uncertain frames labelled by pw.x,
every design retrained on the union, until a target error, the rounds or the DFT budget are spent.

:class:`ActiveLearningSteps` is mixed into :class:`~aiida_emlip.workflows.study.EmlipStudyWorkChain`;
its steps run between the first training and the held-out predictions, so that the validations and the
comparison see the final models. A round:

1. a committee: ``committee − 1`` more seeds of the active-learning design on the current training set
   (``selection: committee``; the design's own model is the first member); from round 2 on, with
   ``warm_start``, each seed starts from its own model of the round before, as the designs do (5.);
2. MD (``emlip.evaluate``, mode ``md``) with that model from every training configuration;
3. the committee's single points on the MD frames, the frames scored (energy spread or force
   disagreement, or SCF non-convergence of a self-consistent head) and the ``per_round`` most uncertain
   chosen, ``min_spacing`` MD steps apart (calcfunction ``select_active``);
4. pw.x on them with the study's DFT settings (``EmlipDatasetWorkChain``), added to the training set
   (calcfunction ``merge_active``; held-out configurations are refused);
5. every design retrained on the union (``EmlipTrainingWorkChain``), then its held-out predictions;
   with ``warm_start`` (the default) each design starts from its model of the round before, for
   ``retrain_epochs`` (default: the design's own epochs) at ``retrain_lr`` (default: its own).

Before each round the loop stops when the model's held-out energy error is at most ``target_error``,
when ``rounds`` are done, or when another round would take the study over its DFT budget. A failure
(MD, DFT, a retraining) ends the loop with the last good models and is named in the exit message.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.engine import ToContext

from aiida_emlip.analysis import active_learning as al
from aiida_emlip.spec import design_config, design_heads, dft_configuration_count
from aiida_emlip.spec_active import candidate_designs, room_for_rounds, scaled_stages, warm_learning_rate
from aiida_emlip.workflows.process_state import how_it_ended
from aiida_emlip.workflows.study_active_functions import (
    merge_active,
    record_active_learning,
    select_active,
    stopped_frames,
)

#: Extras of the study node with the loop's progress (for ``aiida-emlip status``).
PROGRESS = "emlip_active_learning"
#: Parameters of the held-out predictions (the study's final ones reuse the last round's).
HELD_OUT_PARAMETERS = {"mode": "single_point"}


class ActiveLearningSteps:
    """Outline steps of the active-learning loop (see the module docstring); ``al_`` names them."""

    # ------------------------------------------------------------------ set-up and conditions
    def al_enabled(self) -> bool:
        return bool(self.ctx.spec.get("active_learning"))

    def al_going(self) -> bool:
        return self.ctx.al_stop is None

    def al_setup(self):
        """Choose the model (``best``: lowest validation energy error) and the DFT runs left to the loop."""
        spec = self.ctx.spec
        options = spec["active_learning"]
        heads = design_heads(spec)
        candidates = [label for label in candidate_designs(options, heads) if label in self.ctx.models]
        metrics = {label: self.ctx.metrics[label].get_dict() for label in candidates}
        budget = spec.get("budget", {}).get("max_dft_configurations")
        planned = sum(dft_configuration_count(spec).values())
        self.ctx.al_round = 0
        self.ctx.al_stop = None
        self.ctx.al_spent = 0
        self.ctx.al_entries = []
        self.ctx.al_nodes = {}
        self.ctx.al_evaluated = {}
        self.ctx.al_sources = {
            key: {k: v for k, v in entry.items() if k != "geometry"}
            for key, entry in self.ctx.settings.items()
        }
        self.ctx.al_structures = {key: node.uuid for key, node in self.ctx.structures.items()}
        self.ctx.al_info = {
            "selection": options["selection"],
            "committee": options["committee"] if options["selection"] == "committee" else None,
            "uncertainty": options["uncertainty"] if options["selection"] == "committee" else "scf",
            "per_round": options["per_round"],
            "max_rounds": options["rounds"],
            "target_error": options.get("target_error"),
            "min_spacing": options["min_spacing"],
            "md": options["md"],
            "dft_available": room_for_rounds(budget, planned),
            "dft_planned": planned,
        }
        if not candidates:
            self._al_fail(f"no trained design can be its model ({options['model']})")
            return
        self.ctx.al_model = al.best_design(metrics, candidates)
        self.ctx.al_info["model"] = self.ctx.al_model
        how = "lowest validation energy error" if options["model"] == "best" else "named in the spec"
        self._stage("active_learning", f"active learning: model {self.ctx.al_model} ({how})")
        self._al_progress()

    def _al_fail(self, message: str) -> None:
        self.ctx.al_stop = f"failed: {message}"
        self.ctx.failed.append(f"active learning ({message})")
        self.report(f"active learning: {message}")

    def _al_progress(self) -> None:
        self.node.base.extras.set(
            PROGRESS,
            {
                "round": self.ctx.al_round,
                "rounds": self.ctx.al_info["max_rounds"],
                "dft_calls": self.ctx.al_spent,
                "stop": self.ctx.al_stop,
                "model": self.ctx.get("al_model"),
            },
        )

    def _al_link(self, name: str) -> str:
        return f"al{self.ctx.al_round}_{name}"

    # ------------------------------------------------------------------ held-out errors and stopping
    def al_run_held_out(self):
        """Held-out predictions of every current model (round 0: the first training)."""
        futures = {}
        for label, model in self.ctx.models.items():
            builder = self._evaluate_builder(model, self.ctx.held_out, HELD_OUT_PARAMETERS)
            builder.metadata.call_link_label = self._al_link(f"evaluate_{label}")
            futures[f"al_evaluate_{label}"] = self.submit(builder)
        return ToContext(**futures)

    def al_inspect_held_out(self):
        """The held-out errors of this round; whether another round runs."""
        number = self.ctx.al_round
        predictions, evaluated = {}, {}
        for label in self.ctx.models:
            calc = self.ctx[f"al_evaluate_{label}"]
            if "predictions" in calc.outputs:
                predictions[label] = calc.outputs.predictions
                self.ctx.al_nodes[f"predictions_r{number}_{label}"] = calc.outputs.predictions
                if calc.is_finished_ok:
                    evaluated[label] = calc
        self.ctx.al_evaluated = evaluated
        errors = al.held_out_rmse(self.ctx.held_out.to_ase(), {k: v.to_ase() for k, v in predictions.items()})
        entry = self.ctx.al_entries[-1] if number else {"round": 0, "dft_calls": 0}
        entry.update(
            training_size=len(self.ctx.training_set),
            models={label: model.uuid for label, model in self.ctx.models.items()},
        )
        if not number:
            self.ctx.al_entries.append(entry)
        model = self.ctx.al_model
        error = (errors.get(model) or {}).get("energy")
        if error is None:
            self._al_fail(f"no held-out prediction of {model} in round {number}")
            return
        options = self.ctx.al_info
        self.ctx.al_stop = al.stop_reason(
            completed=number,
            rounds=options["max_rounds"],
            test_error=error,
            target_error=options["target_error"],
            spent=self.ctx.al_spent,
            per_round=options["per_round"],
            available=options["dft_available"],
        )
        self.report(
            f"active learning, round {number}: {model}'s held-out energy error {error:.2f} meV/atom"
            + (f"; stop: {self.ctx.al_stop}" if self.ctx.al_stop else "")
        )
        self._al_progress()

    # ------------------------------------------------------------------ one round
    def al_run_committee(self):
        """Start the round; the committee's other seeds of the model's design on the current training set."""
        self.ctx.al_round += 1
        self.ctx.al_entries.append({"round": self.ctx.al_round, "dft_calls": 0})
        self._al_progress()
        options = self.ctx.spec["active_learning"]
        if options["selection"] != "committee":
            return None
        label = self.ctx.al_model
        base = design_config(self.ctx.spec["designs"][label], self.ctx.spec["training"]).get("seed", 0)
        previous = self.ctx.get("al_member_uuids") or {}
        members, initial = {}, {}
        for i in range(1, int(options["committee"])):
            name = f"{label}_seed{int(base) + i}"
            model = orm.load_node(previous[name]) if name in previous else None
            if model is not None and options.get("warm_start", True):
                # from its own model of the round before, as the designs retrain
                retrain = self._retrain_design(label, options.get("retrain_epochs"), self.ctx.training_set)
                config, warm = self._warm_start_from(name, model, retrain["config"])
                if warm:
                    initial[name] = model
                else:
                    config = self._design_config(label)
            else:
                config = self._design_config(label)
            config["seed"] = int(base) + i
            members[name] = {"config": config}
        self.ctx.al_entries[-1]["committee_warm_start"] = {
            name: (initial[name].uuid if name in initial else None) for name in members
        }
        builder = self._training_builder(self.ctx.training_set, members, initial)
        builder.metadata.call_link_label = self._al_link("committee")
        how = f", from their models of round {self.ctx.al_round - 1}" if initial else ""
        self._stage(
            "active_learning",
            f"active learning, round {self.ctx.al_round}: committee of {options['committee']} {label} models"
            + how,
        )
        return ToContext(al_committee=self.submit(builder))

    def _warm_start_from(self, name: str, model: Any, config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """``(config, True)``: ``config`` warm-started from ``model``, at the spec's ``retrain_lr`` when
        it has one; ``(config, False)`` unchanged, with a report line, when the architecture of
        ``config`` differs from ``model``'s (a warm start is refused then)."""
        differ = self._architecture_change(model, config)
        if differ:
            self.report(
                f"active learning, round {self.ctx.al_round}: {name} retrains from scratch: its "
                f"architecture changed ({differ})"
            )
            return config, False
        lr = self.ctx.spec["active_learning"].get("retrain_lr")
        return (warm_learning_rate(config, lr) if lr is not None else config), True

    def _design_config(self, label: str) -> dict[str, Any]:
        training_set = self.ctx.training_set
        elements = sorted(set(training_set.elements) | set(self.ctx.held_out.elements))
        design = self.ctx.spec["designs"][label]
        return design_config(
            design, self.ctx.spec["training"], labels=training_set.label_keys, elements=elements
        )

    def al_inspect_committee(self):
        self.ctx.al_members = []
        if "al_committee" not in self.ctx or self.ctx.spec["active_learning"]["selection"] != "committee":
            return
        node = self.ctx.al_committee
        models = dict(node.outputs.models) if "models" in node.outputs else {}
        self.ctx.al_members = [models[name] for name in sorted(models)]
        self.ctx.al_member_uuids = {name: models[name].uuid for name in sorted(models)}
        self.ctx.al_entries[-1]["committee"] = [self.ctx.models[self.ctx.al_model].uuid] + [
            m.uuid for m in self.ctx.al_members
        ]
        if not self.ctx.al_members:
            self._al_fail(f"no committee member trained in round {self.ctx.al_round}")

    def al_run_md(self):
        """MD with the model from every training configuration (frames every ``interval`` steps)."""
        md = self.ctx.al_info["md"]
        parameters = {
            "mode": "md",
            "ensemble": md["ensemble"],
            "temperature_K": float(md["temperature"]),
            "steps": int(md["steps"]),
            "timestep_fs": float(md["timestep"]),
            "trajectory_stride": int(md["interval"]),
            "seed": int(md["seed"]) + self.ctx.al_round - 1,
        }
        model = self.ctx.models[self.ctx.al_model]
        builder = self._evaluate_builder(model, self.ctx.training_set, parameters)
        builder.metadata.call_link_label = self._al_link("md")
        self._stage(
            "active_learning",
            f"active learning, round {self.ctx.al_round}: MD with {self.ctx.al_model} from "
            f"{len(self.ctx.training_set)} configurations, {md['steps']} steps at {md['temperature']:g} K",
        )
        return ToContext(al_md=self.submit(builder))

    def al_inspect_md(self):
        calc = self.ctx.al_md
        if "trajectory" not in calc.outputs:
            self._al_fail(f"the MD of round {self.ctx.al_round} wrote no trajectory ({how_it_ended(calc)})")
            return
        self.ctx.al_entries[-1]["md"] = {
            "calculation": calc.uuid,
            "trajectory": calc.outputs.trajectory.uuid,
            "frames": len(calc.outputs.trajectory),
            "exit_status": calc.exit_status,
        }

    def al_run_scoring(self):
        """The committee's single points on the MD frames (nothing to run for SCF failures)."""
        futures = {}
        trajectory = self.ctx.al_md.outputs.trajectory
        for i, member in enumerate(self.ctx.al_members, start=1):
            builder = self._evaluate_builder(member, trajectory, {"mode": "single_point"})
            builder.metadata.call_link_label = self._al_link(f"committee_{i}")
            futures[f"al_member_{i}"] = self.submit(builder)
        return ToContext(**futures)

    def al_select(self):
        """Score the frames and choose the ones to label (calcfunction ``select_active``)."""
        nodes: dict[str, orm.Data] = {}
        for i in range(1, len(self.ctx.al_members) + 1):
            calc = self.ctx[f"al_member_{i}"]
            if "predictions" not in calc.outputs:
                self._al_fail(f"committee member {i} predicted nothing ({how_it_ended(calc)})")
                return
            nodes[f"member_{i}"] = calc.outputs.predictions
        md = self.ctx.al_md
        stopped = self._stopped_frames(md)
        if stopped is not None:
            nodes["stopped"] = stopped
        trajectory = md.outputs.trajectory
        sources = {str(a.info.get("key")) for a in trajectory.to_ase()}
        for key in sorted(sources):
            nodes[f"source_{key}"] = orm.load_node(self.ctx.al_structures[key])
        settings = {
            "selection": self.ctx.al_info["selection"],
            "uncertainty": self.ctx.al_info["uncertainty"],
            "per_round": self.ctx.al_info["per_round"],
            "min_spacing": self.ctx.al_info["min_spacing"],
            "round": self.ctx.al_round,
            "sources": {key: self.ctx.al_sources[key] for key in sorted(sources)},
        }
        outputs = select_active(
            trajectory=trajectory,
            settings=orm.Dict(settings),
            **nodes,
            metadata={"call_link_label": self._al_link("select")},
        )
        scores = outputs["scores"]
        self.ctx.al_nodes[f"scores_r{self.ctx.al_round}"] = scores
        self.ctx.al_chosen = {k[2:]: v for k, v in outputs.items() if k.startswith("c_")}
        self.ctx.al_chosen_settings = outputs["settings"].get_dict()
        self.ctx.al_origins = {
            row["key"]: {"source": row["source"], "md_step": row["md_step"], "score": row["score"]}
            for row in scores["candidates"]
            if row.get("key")
        }
        summary = scores["summary"]
        if not self.ctx.al_chosen:
            self.ctx.al_stop = f"no MD frame to label in round {self.ctx.al_round}"
            self.report(f"active learning: {self.ctx.al_stop}")
            return
        picked = ", ".join(f"{s:.3g}" for s in summary["selected"])
        self.report(
            f"active learning, round {self.ctx.al_round}: {len(self.ctx.al_chosen)} of "
            f"{summary['candidates']} frames chosen (scores {picked})"
        )

    def _stopped_frames(self, md) -> Any:
        """The final frames of MD runs that stopped on a non-converged SCF (a dataset node), if any."""
        if self.ctx.al_info["selection"] != "scf_failures" or "predictions" not in md.outputs:
            return None
        rows = md.outputs.summary.get_dict().get("structures") or []
        stopped = [row["index"] for row in rows if row.get("scf_converged") is False]
        if not stopped:
            return None
        return stopped_frames(
            predictions=md.outputs.predictions,
            settings=orm.Dict({"indices": stopped}),
            metadata={"call_link_label": self._al_link("stopped")},
        )

    def al_run_labels(self):
        """pw.x on the chosen frames with the study's DFT settings."""
        builder = self._dataset_builder(self.ctx.al_chosen, self.ctx.al_chosen_settings)
        builder.metadata.call_link_label = self._al_link("dft")
        count = len(self.ctx.al_chosen)
        self.ctx.al_spent += count
        self.ctx.al_entries[-1]["dft_calls"] = count
        self._al_progress()
        self._stage("active_learning", f"active learning, round {self.ctx.al_round}: pw.x on {count} frames")
        return ToContext(al_dft=self.submit(builder))

    def al_inspect_labels(self):
        """Add the labelled frames to the training set (calcfunction ``merge_active``)."""
        node = self.ctx.al_dft
        entry = self.ctx.al_entries[-1]
        failures = node.outputs.report.get_dict().get("failures", {}) if "report" in node.outputs else {}
        entry["failed"] = sorted(failures)
        if "dataset" not in node.outputs:
            self._al_fail(f"no frame of round {self.ctx.al_round} was labelled ({how_it_ended(node)})")
            return
        labels = node.outputs.dataset
        entry["labelled"] = len(labels)
        entry["labels"] = labels.uuid
        settings = {
            "round": self.ctx.al_round,
            "held_out_keys": self.ctx.split.get_dict()["held_out_keys"],
            "origins": self.ctx.al_origins,
        }
        self.ctx.al_merged = merge_active(
            training_set=self.ctx.training_set,
            labels=labels,
            settings=orm.Dict(settings),
            metadata={"call_link_label": self._al_link("merge")},
        )
        for key, structure in self.ctx.al_chosen.items():
            self.ctx.al_structures[key] = structure.uuid
            self.ctx.al_sources[key] = self.ctx.al_chosen_settings[key]

    def al_run_training(self):
        """Every design (that trained before) on the union; warm-started from its previous model."""
        options = self.ctx.spec["active_learning"]
        epochs = options.get("retrain_epochs")
        designs = {label: self._retrain_design(label, epochs) for label in self.ctx.models}
        initial: dict[str, Any] = {}
        if options.get("warm_start", True):
            for label, design in designs.items():
                model = self.ctx.models[label]
                design["config"], warm = self._warm_start_from(label, model, design["config"])
                if warm:
                    initial[label] = model
        self.ctx.al_entries[-1]["warm_start"] = {
            label: (initial[label].uuid if label in initial else None) for label in designs
        }
        self.ctx.al_entries[-1]["retrain_epochs"] = {
            label: sum(int(stage.get("epochs", 10)) for stage in design["config"].get("stages") or [{}])
            for label, design in designs.items()
        }
        builder = self._training_builder(self.ctx.al_merged, designs, initial)
        builder.metadata.call_link_label = self._al_link("training")
        how = f"from the previous models ({', '.join(initial)})" if initial else "from scratch"
        self._stage(
            "active_learning",
            f"active learning, round {self.ctx.al_round}: retraining {', '.join(designs)} on "
            f"{len(self.ctx.al_merged)} configurations, {how}",
        )
        return ToContext(al_training=self.submit(builder))

    def _retrain_design(self, label: str, epochs: int | None, dataset: Any = None) -> dict[str, Any]:
        """Design ``label`` as an emlip-train config for ``dataset`` (default: the merged set of this
        round; ``epochs``: ``retrain_epochs``)."""
        design = dict(self.ctx.spec["designs"][label])
        if epochs is not None and "config" not in design:
            design["epochs"] = int(epochs)  # a preset shares them among its stages itself
        merged = dataset if dataset is not None else self.ctx.al_merged
        elements = sorted(set(merged.elements) | set(self.ctx.held_out.elements))
        config = design_config(design, self.ctx.spec["training"], labels=merged.label_keys, elements=elements)
        if epochs is not None and "config" in design:
            config["stages"] = scaled_stages(config.get("stages") or [{}], int(epochs))
        return {"config": config}

    @staticmethod
    def _architecture_change(model: Any, config: dict[str, Any]) -> str:
        """The architecture keys in which ``config`` differs from ``model``'s ('' when none)."""
        from aiida_emlip.training.warmstart import architecture_differences

        values = dict(config.get("model") or {})
        values.setdefault("elements", model.base.attributes.get("elements"))
        try:
            return "; ".join(architecture_differences(model.base.attributes.get("config"), values))
        except (TypeError, ValueError, KeyError) as exc:
            return f"cannot compare: {exc}"

    def al_inspect_training(self):
        """Take the retrained models, all or none (the designs keep sharing one training set)."""
        node = self.ctx.al_training
        models = dict(node.outputs.models) if "models" in node.outputs else {}
        missing = sorted(set(self.ctx.models) - set(models))
        if missing:
            self._al_fail(
                f"retraining of {', '.join(missing)} in round {self.ctx.al_round} failed; "
                "the models of the previous round are kept"
            )
            return
        self.ctx.models = models
        self.ctx.metrics = dict(node.outputs.metrics)
        self.ctx.training_set = self.ctx.al_merged

    # ------------------------------------------------------------------ the record
    def al_results(self):
        """The ``active_learning`` record (calcfunction) as an output."""
        if self.ctx.al_stop is None:  # cannot happen: the loop ends on a reason
            self.ctx.al_stop = "ended"
        settings = {
            **self.ctx.al_info,
            "model": self.ctx.get("al_model"),
            "stop_reason": self.ctx.al_stop,
            "rounds": self.ctx.al_entries,
            "initial_training_size": len(self.ctx.split.get_dict()["training_keys"]),
            "final_training_size": len(self.ctx.training_set),
            "training_set": self.ctx.training_set.uuid,
        }
        record = record_active_learning(
            held_out=self.ctx.held_out,
            settings=orm.Dict(settings),
            **self.ctx.al_nodes,
            metadata={"call_link_label": "active_learning"},
        )
        self.ctx.active_learning = record
        self.out("active_learning", record)
        self._al_progress()
        self.report(
            f"active learning: {record['rounds_run']} round(s), {record['dft_calls']} pw.x runs; "
            f"stopped: {self.ctx.al_stop}"
        )
