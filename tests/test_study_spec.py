"""The study spec: the bundled demo parses; bad specs report every problem with its line."""

from __future__ import annotations

import textwrap

import pytest

from aiida_emlip.spec import (
    SpecError,
    bundled_spec_text,
    design_capabilities,
    design_config,
    dft_configuration_count,
    held_out_geometries,
    parse_spec,
)

GOOD = textwrap.dedent(
    """\
    name: tiny
    dft:
      protocol: fast
      overrides: {ecutwfc: 20.0}
    systems:
      water:
        structure: {molecule: H2O, box: 8.0}
        rattle: {n: 3, stdev: 0.05}
        charges: [0, 1]
        isolated: true
    designs: [sr, charges]
    training: {epochs: 2}
    """
)


class FakeResources:
    """Codes pw@localhost, emlip-train@localhost, emlip-eval@localhost; a family with H and O."""

    def code_problem(self, label: str, plugin: str) -> str | None:
        known = {"pw@localhost", "emlip-train@localhost", "emlip-eval@localhost"}
        return None if label in known else f"no code {label!r} in the profile"

    def family_elements(self, label: str) -> set[str] | None:
        return {"H", "O"} if label == "emlip-ld1-pbe-v1" else None


def test_demo_spec_parses_with_defaults():
    spec = parse_spec(bundled_spec_text("demo"), "demo.yaml")
    assert list(spec["designs"]) == ["sr", "charges", "qeq", "scf"]
    assert spec["split"]["held_out_fraction"] == pytest.approx(0.2)
    counts = dft_configuration_count(spec)
    assert counts["systems.vacancy"] == 8 and counts["validations.defect"] == 4
    assert sum(counts.values()) <= spec["budget"]["max_dft_configurations"]
    held = held_out_geometries(spec)
    assert all(len(v) == 1 for v in held.values())


def test_good_spec_defaults_and_design_configs():
    spec = parse_spec(GOOD, "tiny.yaml", resources=FakeResources())
    assert spec["codes"]["pw"] == "pw@localhost" and spec["pseudo_family"] == "emlip-ld1-pbe-v1"
    assert spec["split"] == {"held_out_fraction": 0.25, "seed": 0}
    config = design_config(spec["designs"]["charges"], spec["training"], labels=["energy", "forces"])
    assert config["data"]["test_fraction"] == 0.0 and config["stages"][0]["epochs"] == 2
    assert config["model"]["head"]["name"] == "charges"


BAD = textwrap.dedent(
    """\
    name: bad
    colour: blue
    codes:
      pw: pw@nowhere
    dft:
      protocol: fastest
    systems:
      water:
        structure: {molecule: H2O}
        rattle: {n: 2}
        charges: one
      salt:
        structure: {bulk: NaCl, crystalstructure: rocksalt, a: 5.64}
        rattle: {n: 2}
    training:
      epochs: many
    designs:
      sr: {preset: sr}
      mine: {preset: qqe}
    validations:
      defect:
        host: {bulk: NaCl, crystalstructure: rocksalt, a: 5.64, cubic: true}
        element: Cl
        charge_states: [0, 1]
      phonon_bands: {}
    """
)


def test_training_processes_per_machine_are_checked():
    """training.options reach every emlip.train calculation: nproc_per_node must be a whole number ≥ 1."""
    good = GOOD.replace("training: {epochs: 2}", "training: {epochs: 2, options: {nproc_per_node: 2}}")
    assert good != GOOD
    assert parse_spec(good, "tiny.yaml", resources=FakeResources())["training"]["options"] == {
        "nproc_per_node": 2
    }
    for value, message in ((0, "at least 1"), (1.5, "whole number")):
        bad = GOOD.replace(
            "training: {epochs: 2}", f"training: {{epochs: 2, options: {{nproc_per_node: {value}}}}}"
        )
        with pytest.raises(SpecError) as info:
            parse_spec(bad, "tiny.yaml", resources=FakeResources())
        assert [p.path for p in info.value.problems] == ["training.options.nproc_per_node"]
        assert message in info.value.format()


MISSPELT = textwrap.dedent(
    """\
    name: cluster
    dft:
      protocol: fast
      overrides:
        options: {queue: cpu, max_wallclock_seconds: 1800}
    systems:
      water:
        structure: {molecule: H2O, box: 8.0}
        rattle: {n: 3, stdev: 0.05}
    designs: [sr]
    training:
      epochs: 2
      options:
        resource: {num_machines: 1}
        nproc_per_node: 2
        custom_scheduler_command: "#SBATCH --gres=gpu:1"
    evaluation:
      options:
        max_wallclock_second: 600
        partition: short
        nproc_per_node: 2
        account: my-project
    """
)


def test_misspelt_scheduler_options_are_reported_with_the_closest_name():
    """Every option name is checked against the options of the calculations that get it (read from
    their specs), with its line and the closest valid name; a misspelt one never reaches a job."""
    with pytest.raises(SpecError) as info:
        parse_spec(MISSPELT, "cluster.yaml", resources=FakeResources())
    found = {(p.line, p.path): p.message for p in info.value.problems}
    assert set(found) == {
        (5, "dft.overrides.options.queue"),
        (14, "training.options.resource"),
        (16, "training.options.custom_scheduler_command"),
        (19, "evaluation.options.max_wallclock_second"),
        (20, "evaluation.options.partition"),
        (21, "evaluation.options.nproc_per_node"),
    }, info.value.format()
    assert found[(5, "dft.overrides.options.queue")].endswith("did you mean 'queue_name'?")
    assert "emlip.train calculations; did you mean 'resources'?" in found[(14, "training.options.resource")]
    assert found[(16, "training.options.custom_scheduler_command")].endswith("'custom_scheduler_commands'?")
    assert found[(19, "evaluation.options.max_wallclock_second")].endswith("'max_wallclock_seconds'?")
    assert found[(20, "evaluation.options.partition")].endswith("did you mean 'queue_name'?")
    # emlip.train's own option, not one of emlip.evaluate's: each block is checked against its plugin
    assert (
        "not an option of the emlip.evaluate calculations" in found[(21, "evaluation.options.nproc_per_node")]
    )
    assert "cluster.yaml:14: training.options.resource: not an option" in info.value.format()
    fixed = (
        MISSPELT.replace("{queue: cpu,", "{queue_name: cpu,")
        .replace("resource:", "resources:")
        .replace("custom_scheduler_command:", "custom_scheduler_commands:")
        .replace("max_wallclock_second:", "max_wallclock_seconds:")
        .replace("partition:", "queue_name:")
        .replace("    nproc_per_node: 2\n    account", "    account")
    )
    spec = parse_spec(fixed, "cluster.yaml", resources=FakeResources())
    assert spec["training"]["options"]["resources"] == {"num_machines": 1}
    assert spec["evaluation"]["options"] == {
        "max_wallclock_seconds": 600,
        "queue_name": "short",
        "account": "my-project",
    }


def test_option_names_come_from_the_calculation_specs():
    from aiida.engine import CalcJob
    from aiida.plugins import CalculationFactory

    from aiida_emlip.spec import calcjob_option_names, option_name_problem

    base = set(CalcJob.spec().inputs["metadata"]["options"])
    train, evaluate = set(calcjob_option_names("emlip.train")), set(calcjob_option_names("emlip.evaluate"))
    assert {"max_wallclock_seconds", "resources", "queue_name", "account", "qos", "withmpi"} <= base
    assert train == set(CalculationFactory("emlip.train").spec().inputs["metadata"]["options"])
    assert train - base == {"nproc_per_node"} and evaluate == base
    assert "without_xml" in calcjob_option_names("quantumespresso.pw")
    assert option_name_problem("max_wallclock_seconds", "emlip.evaluate") is None
    listed = option_name_problem("zzz", "emlip.evaluate")
    assert listed.startswith("not an option of the emlip.evaluate calculations; the options: account, ")


def test_training_workchain_refuses_a_misspelt_train_option(aiida_profile):
    """The Python path (``train_options`` of ``emlip.training``) is checked the same way."""
    from aiida import orm

    from aiida_emlip.workflows.training import EmlipTrainingWorkChain, validate_train_options

    problem = validate_train_options(orm.Dict({"max_wallclock_second": 60}), None)
    assert problem == (
        "train_options.max_wallclock_second: not an option of the emlip.train calculations; "
        "did you mean 'max_wallclock_seconds'?"
    )
    assert validate_train_options(orm.Dict({"max_wallclock_seconds": 60, "nproc_per_node": 2}), None) is None
    builder = EmlipTrainingWorkChain.get_builder()
    with pytest.raises(ValueError, match=r"train_options\.resource: .*did you mean 'resources'\?"):
        builder.train_options = orm.Dict({"resource": {"num_machines": 1}})


def test_bad_spec_reports_every_problem_with_its_line():
    with pytest.raises(SpecError) as info:
        parse_spec(BAD, "bad.yaml")
    found = {(p.line, p.path) for p in info.value.problems}
    assert (2, "colour") in found
    assert (6, "dft.protocol") in found
    assert (11, "systems.water.charges") in found
    assert (16, "training.epochs") in found
    assert (19, "designs.mine.preset") in found
    assert (25, "validations.phonon_bands") in found
    text = info.value.format()
    assert "bad.yaml:19: designs.mine.preset: unknown preset 'qqe'" in text
    assert "Traceback" not in text


def test_validation_needing_what_no_design_provides():
    spec = GOOD.replace("designs: [sr, charges]", "designs: [sr]") + textwrap.dedent(
        """\
        validations:
          defect:
            host: {bulk: NaCl, crystalstructure: rocksalt, a: 5.64, cubic: true}
            element: Cl
            charge_states: [0, 1]
        """
    )
    with pytest.raises(SpecError) as info:
        parse_spec(spec, "s.yaml")
    (problem,) = info.value.problems
    assert problem.line == 14 and problem.path == "validations.defect"
    assert "needs a design that predicts charges" in problem.message


def test_resources_missing_codes_and_pseudos_and_budget():
    salt = "  salt:\n    structure: {bulk: NaCl, crystalstructure: rocksalt, a: 5.64}\n    rattle: {n: 2}\n"
    text = GOOD.replace("name: tiny", "name: tiny\ncodes: {train: gpu-train@cluster}")
    text = text.replace("designs:", salt + "designs:", 1)
    with pytest.raises(SpecError) as info:
        parse_spec(text + "budget: {max_dft_configurations: 5}\n", "r.yaml", resources=FakeResources())
    messages = {p.path: p.message for p in info.value.problems}
    assert "needs 8 pw.x configurations (water 6, salt 2)" in messages["budget.max_dft_configurations"]
    # within budget, the profile's codes and pseudopotentials are checked
    with pytest.raises(SpecError) as info:
        parse_spec(text, "r.yaml", resources=FakeResources())
    problems = {p.path: (p.line, p.message) for p in info.value.problems}
    assert problems["codes.train"] == (2, "no code 'gpu-train@cluster' in the profile")
    assert (
        problems["systems.salt"][0] == 12 and "no pseudopotential for Cl, Na" in problems["systems.salt"][1]
    )


def test_yaml_syntax_and_duplicate_keys():
    with pytest.raises(SpecError, match=r"d.yaml:3: designs: duplicate key|d.yaml:3: .*duplicate"):
        parse_spec("name: x\ndesigns: [sr]\ndesigns: [qeq]\n", "d.yaml")
    with pytest.raises(SpecError, match=r"y.yaml:2: not valid YAML"):
        parse_spec("name: x\n  bad: [\n", "y.yaml")


def test_interface_validation_block():
    """The interface validation: defaults filled, its pw.x cost counted, bad fields and facets reported."""
    spec = parse_spec(
        GOOD + "validations:\n  interface: {fields: [0.05, 0.1], charges: [-0.2, 0.0, 0.2]}\n", "i.yaml"
    )
    options = spec["validations"]["interface"]
    assert options["symbol"] == "Al" and options["facet"] == "111" and options["protocol"] == "fast"
    assert dft_configuration_count(spec)["validations.interface"] == 1 + 4 + 2
    bad = GOOD + "validations:\n  interface: {fields: [-0.1], facet: '110'}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(bad, "i.yaml")
    messages = {p.path: p.message for p in info.value.problems}
    assert "positive" in messages["validations.interface.fields"]
    assert "111" in messages["validations.interface.facet"]
    # the interface itself is checked before anything runs: size, protocol, a metal the sampler lacks
    bad = GOOD + "validations:\n  interface: {size: [1, 2], protocol: sloppy}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(bad, "i.yaml")
    messages = {p.path: p.message for p in info.value.problems}
    assert "three positive integers" in messages["validations.interface.size"]
    assert "unknown protocol 'sloppy'" in messages["validations.interface.protocol"]
    with pytest.raises(SpecError, match="the interface cannot be built"):
        parse_spec(GOOD + "validations:\n  interface: {symbol: Xx}\n", "i.yaml")


def test_response_validation_block():
    """The response validation: its pw.x cost from the protocol file, unknown probes reported."""
    spec = parse_spec(GOOD + "validations:\n  response: {probes: [dissociation, polarizability]}\n", "r.yaml")
    # fast: four distances, chains of 1–3 molecules with ± fields
    assert dft_configuration_count(spec)["validations.response"] == 4 + 2 * 3
    with pytest.raises(SpecError) as info:
        parse_spec(GOOD + "validations:\n  response: {probes: [phonons]}\n", "r.yaml")
    assert "probes must be some of" in info.value.problems[0].message


def test_structure_files_relative_to_the_spec(tmp_path, monkeypatch):
    """``file`` blocks resolve against the spec's folder, for systems and a validation's host, from any
    working directory; a missing file is a problem with its line, not a traceback."""
    from ase.build import bulk
    from ase.io import write

    from aiida_emlip.spec import load_spec

    folder = tmp_path / "study"
    (folder / "cells").mkdir(parents=True)
    write(folder / "cells" / "nacl.xyz", bulk("NaCl", "rocksalt", a=5.64, cubic=True), format="extxyz")
    text = textwrap.dedent(
        """\
        name: files
        systems:
          host:
            structure: {file: cells/nacl.xyz}
            rattle: {n: 3, stdev: 0.05}
            charges: [0]
        designs: [sr, charges]
        validations:
          defect:
            host: {file: cells/nacl.xyz}
            element: Cl
            charge_states: [0, 1]
            supercell: [1, 1, 1]
        """
    )
    (folder / "spec.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    spec = load_spec("study/spec.yaml")
    host = spec["validations"]["defect"]["host"]["atoms"]
    assert host["symbols"].count("Cl") == 4 and len(host["symbols"]) == 8
    assert spec["systems"]["host"]["structure"]["atoms"]["symbols"] == host["symbols"]
    (folder / "spec.yaml").write_text(
        text.replace("host: {file: cells/nacl.xyz}", "host: {file: cells/x.xyz}")
    )
    with pytest.raises(SpecError) as error:
        load_spec("study/spec.yaml")
    assert "spec.yaml:10" in str(error.value) and "x.xyz" in str(error.value)


def test_example_studies_parse():
    """The example studies under examples/studies are valid specs (with their structure files)."""
    from pathlib import Path

    from aiida_emlip.spec import load_spec

    folder = Path(__file__).resolve().parent.parent / "examples" / "studies"
    specs = sorted(folder.glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        assert spec["validations"] and spec["designs"]
    quartz = load_spec(folder / "quartz_vacancy.yaml")
    assert quartz["validations"]["defect"]["charge_states"] == [0, 1, 2]
    assert len(quartz["validations"]["defect"]["host"]["atoms"]["symbols"]) == 9


def test_design_with_induced_dipoles():
    """``induction: true`` (or the model's induction options) adds induced dipoles to a preset; a bad
    option or induction beside a full config is reported with its line."""
    text = GOOD.replace(
        "designs: [sr, charges]",
        "designs:\n  sr: {preset: sr}\n  pol: {preset: split, induction: true}\n"
        "  soft: {preset: scf, induction: {enabled: true, initial_polarizability: 1.2}}",
    )
    spec = parse_spec(text, "i.yaml", resources=FakeResources())
    config = design_config(spec["designs"]["pol"], spec["training"], labels=["energy", "forces"])
    assert config["model"]["induction"] == {"enabled": True}
    plain = design_config({"preset": "split", "induction": False}, spec["training"])
    assert plain["model"]["induction"] == {"enabled": False}
    soft = design_capabilities(spec["designs"]["soft"], spec["training"])
    assert soft >= {"polarizability", "atomic_dipoles"}
    assert "polarizability" not in design_capabilities(spec["designs"]["sr"], spec["training"])
    bad = text.replace("initial_polarizability: 1.2", "initial_polarizability: -1")
    with pytest.raises(SpecError) as info:
        parse_spec(bad, "b.yaml", resources=FakeResources())
    (problem,) = info.value.problems
    assert problem.path == "designs.soft" and "initial_polarizability" in problem.message


def test_evaluation_options_reach_every_evaluate_job(pw_code, pp_code, eval_code, pseudo_family):
    """evaluation.options (a partition, a walltime) are laid over the defaults of every emlip.evaluate:
    the study's own and each validation's; bad values are reported with their path, absent means as before."""
    from aiida_emlip.spec import EVALUATION_OPTIONS, evaluation_options
    from aiida_emlip.workflows.study_registry import VALIDATIONS, Context

    block = "evaluation: {options: {queue_name: short, max_wallclock_seconds: 600}}\n"
    text = GOOD + block + "validations:\n  interface: {}\n  response: {}\n"
    spec = parse_spec(text, "e.yaml")
    wanted = {**EVALUATION_OPTIONS, "queue_name": "short", "max_wallclock_seconds": 600}
    assert evaluation_options(spec) == wanted
    plain = parse_spec(GOOD, "e.yaml", resources=FakeResources())
    assert "evaluation" not in plain and evaluation_options(plain) == EVALUATION_OPTIONS
    context = Context(spec=spec, models={}, codes={"pw": pw_code, "pp": pp_code, "eval": eval_code})
    for name in ("interface", "response"):
        builder = VALIDATIONS[name].build(spec["validations"][name], context)
        assert builder.overrides.get_dict()["options"] == wanted, name
    bad = GOOD + "evaluation: {options: {max_wallclock_seconds: -5, resources: 4, withmpi: maybe}}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(bad, "e.yaml", resources=FakeResources())
    assert {p.path for p in info.value.problems} == {
        "evaluation.options.max_wallclock_seconds",
        "evaluation.options.resources",
        "evaluation.options.withmpi",
    }


def test_design_config_with_a_valid_or_test_path_is_refused():
    """A design's full config may not name data.valid / data.test files (read on the remote computer,
    outside the provenance; the study holds out its own structures)."""
    import json

    from aiida_emlip.training.presets import preset_config

    config = preset_config("sr", labels=(), epochs=2)
    for role in ("valid", "test"):
        config["data"] = {role: "/scratch/mine.xyz"}
        bad = GOOD.replace(
            "designs: [sr, charges]\n", f"designs:\n  mine:\n    config: {json.dumps(config)}\n"
        )
        with pytest.raises(SpecError) as info:
            parse_spec(bad, "tiny.yaml", resources=FakeResources())
        assert [p.path for p in info.value.problems] == ["designs.mine.config"]
        assert f"'data.{role}' ('/scratch/mine.xyz') is a path" in info.value.format()
        assert f"{role}_set" in info.value.format()
