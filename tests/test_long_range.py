"""The long-range benchmark at reduced size: pw.x + Hirshfeld charges → designs → held-out errors."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms

from aiida_emlip import schema
from aiida_emlip.analysis.long_range import (
    fragment_charges,
    long_range_table,
    over_initialisations,
    separation,
)
from aiida_emlip.structures.fragments import closest_distance, fragment_pair_scan


def _pair(q_first: float, energy: float, sep: float) -> Atoms:
    frame = fragment_pair_scan("Li", "H2O", [sep], total_charge=1.0)[0]
    frame.info[schema.ENERGY] = energy
    frame.arrays[schema.CHARGES] = np.array([q_first, -0.4, 0.2 + (1 - q_first) / 2, 0.2 + (1 - q_first) / 2])
    return frame


def test_fragment_pair_scan_geometry():
    frames = fragment_pair_scan("F", "H2O", [1.6, 4.0, 8.5], total_charge=-1.0, orientations=2, seed=4)
    assert len(frames) == 6
    for atoms in frames:
        assert closest_distance(atoms.positions[:1], atoms.positions[1:]) == pytest.approx(separation(atoms))
        assert atoms.info[schema.TOTAL_CHARGE] == -1.0 and atoms.pbc.all()
    water = molecule_distances(frames[0].positions[1:])
    assert water == pytest.approx(molecule_distances(frames[-1].positions[1:]))  # rigid rotations only
    with pytest.raises(ValueError, match="longer cell"):
        fragment_pair_scan("Li", "H2O", [15.0])


def test_figures_over_initialisations():
    """Mean, smallest and largest figure of each design over initialisations, each table against its own
    sr; the ratio of the mean neutral errors differs from the mean of the ratios when one baseline is
    lucky (here sr's 5 against 10 and 10), and decides the goal."""

    def table(sr_neutral: float, split_neutral: float, far_ratio: float) -> dict:
        return {
            "sr": {"neutral_energy_rmse": sr_neutral, "neutral_energy_ratio": 1.0, "far_energy_ratio": 1.0},
            "split": {
                "neutral_energy_rmse": split_neutral,
                "neutral_energy_ratio": split_neutral / sr_neutral,
                "far_energy_ratio": far_ratio,
                "fragment_charge_max_error": None,
            },
        }

    summary = over_initialisations([table(10.0, 10.0, 0.2), table(5.0, 10.0, 0.3), table(10.0, 13.0, 0.4)])
    split = summary["split"]
    assert split["n_initialisations"] == 3
    assert split["neutral_energy_ratio"] == pytest.approx((1.0 + 2.0 + 1.3) / 3)
    assert (split["neutral_energy_ratio_min"], split["neutral_energy_ratio_max"]) == (1.0, 2.0)
    assert split["far_energy_ratio"] == pytest.approx(0.3) and split["far_energy_ratio_max"] == 0.4
    assert split["mean_neutral_ratio"] == pytest.approx(11.0 / (25.0 / 3))  # 1.32, not 1.43
    assert split["fragment_charge_max_error"] is None  # no figure in any table: left out
    assert summary["sr"]["mean_neutral_ratio"] == pytest.approx(1.0)
    partial = over_initialisations([table(10.0, 10.0, 0.2), {"sr": table(4.0, 4.0, 1.0)["sr"]}])
    assert partial["split"]["n_initialisations"] == 1 and partial["split"]["far_energy_ratio"] == 0.2


def molecule_distances(positions: np.ndarray) -> list[float]:
    return sorted(np.linalg.norm(positions[:, None] - positions[None], axis=-1).ravel().tolist())


def test_long_range_table_numbers():
    """Far/near split at the cutoff, ratios to sr and fragment charge errors, on hand-made frames."""
    reference = [_pair(1.0, 0.0, 2.0), _pair(1.0, 0.0, 6.0), _pair(1.0, 0.0, 8.0)]
    sr = [_pair(0.0, e, s) for e, s in ((0.4, 2.0), (0.8, 6.0), (-0.8, 8.0))]
    good = [_pair(q, e, s) for q, e, s in ((0.8, 0.4, 2.0), (0.95, 0.2, 6.0), (0.98, -0.2, 8.0))]
    for frame in sr:  # sr has no charges
        del frame.arrays[schema.CHARGES]
    table = long_range_table(reference, {"sr": sr, "good": good}, cutoff=4.0)
    assert table["sr"]["n_far"] == 2
    assert table["sr"]["far_energy_rmse"] == pytest.approx(200.0)  # 0.8 eV / 4 atoms
    assert table["good"]["far_energy_ratio"] == pytest.approx(0.25)
    assert table["sr"]["fragment_charge_mae"] is None
    assert table["good"]["fragment_charge_max_error"] == pytest.approx(0.2)  # at contact
    assert table["good"]["far_fragment_charge_max_error"] == pytest.approx(0.05)
    assert fragment_charges(reference[0], reference[0].arrays[schema.CHARGES]) == pytest.approx([1.0, 0.0])


@pytest.mark.pw
def _ion_and_dipole(sign: float) -> Atoms:
    """Li⁺ and a neutral water carrying one point-like dipole (charges zero), 6 Å apart along z."""
    frame = fragment_pair_scan("Li", "H2O", [6.0], total_charge=1.0)[0]
    frame.arrays[schema.CHARGES] = np.array([1.0, 0.0, 0.0, 0.0])
    dipoles = np.zeros((4, 3))
    dipoles[1, 2] = sign * 0.4  # on the oxygen, along the separation
    frame.arrays[schema.ATOMIC_DIPOLES] = dipoles
    return frame


def test_multipole_interaction_ion_dipole():
    """The reference interaction is linear in the water's dipole (periodic cell) and equals
    k q p·r̂ / r² for the pair without periodicity."""
    from aiida_emlip.analysis.long_range import multipole_interaction
    from aiida_emlip.schema import COULOMB_CONSTANT

    up, down = multipole_interaction(_ion_and_dipole(1.0)), multipole_interaction(_ion_and_dipole(-1.0))
    assert up == pytest.approx(-down, rel=1e-5)
    assert multipole_interaction(_ion_and_dipole(0.0)) == pytest.approx(0.0, abs=1e-6)  # Ewald accuracy
    isolated = _ion_and_dipole(1.0)
    isolated.pbc = False
    r = isolated.positions[1] - isolated.positions[0]
    expected = -COULOMB_CONSTANT * 0.4 * r[2] / np.linalg.norm(r) ** 3  # E = −p·E_ion
    assert multipole_interaction(isolated) == pytest.approx(expected, rel=1e-6)


def test_local_model_has_no_interaction_beyond_cutoff():
    """``sr`` (no long-range term) gives zero interaction beyond its cutoff; the error is then the
    reference interaction itself."""
    from aiida_emlip.analysis.long_range import interaction_errors, model_interaction
    from aiida_emlip.models.model import EmlipModel, ModelConfig

    backbone = {"num_channels": 4, "num_interactions": 2, "max_ell": 2, "r_max": 4.0, "mlp_hidden": 4}
    model = EmlipModel(ModelConfig(elements=["H", "Li", "O"], backbone=backbone))
    frame = _ion_and_dipole(1.0)
    frame.info[schema.ENERGY] = 0.0
    assert model_interaction(model, frame) == pytest.approx(0.0, abs=1e-9)
    errors = interaction_errors({"sr": model}, [frame], cutoff=model.cutoff)
    assert errors["sr"]["rms"] == pytest.approx(errors["reference"]["rms"])


@pytest.mark.slow
def test_long_range_benchmark_reduced(tmp_path, pw_code, pp_code, pseudo_family):
    """Li⁺ + H₂O in a charged cell: a supervised electrostatic design beats sr beyond the cutoff.

    Reduced size (pw.x at low cutoff, Hirshfeld charges, 20 configurations, 80 epochs); a recipe that
    lost the multipole supervision or the long-range energy would fail the ratio and the charge checks.
    """
    from aiida.engine import run_get_node

    from aiida_emlip.analysis.long_range import predict_frames
    from aiida_emlip.data import EmlipDatasetData
    from aiida_emlip.models.io import load_model
    from aiida_emlip.training.config import parse_config
    from aiida_emlip.training.presets import preset_config
    from aiida_emlip.training.trainer import Trainer
    from aiida_emlip.workflows.dataset import EmlipDatasetWorkChain

    frames = fragment_pair_scan(
        "Li", "H2O", np.linspace(1.8, 8.0, 10), total_charge=1.0, orientations=2, rattle=0.02, seed=2
    )
    overrides = {
        "ecutwfc": 25.0,
        "ecutrho": 200.0,
        "kpoints_distance": 10.0,
        "conv_thr_per_atom": 1e-9,
        "postprocess": {"hirshfeld": True},
    }
    builder = EmlipDatasetWorkChain.get_builder_from_protocol(
        pw_code, EmlipDatasetData(frames=frames), pseudo_family.label, protocol="fast", overrides=overrides
    )
    builder.pp_code = pp_code
    results, node = run_get_node(builder)
    assert node.is_finished_ok, node.exit_status
    labelled = results["dataset"].to_ase()
    assert all(schema.CHARGES in a.arrays for a in labelled)
    far_li = [a.arrays[schema.CHARGES][0] for a in labelled if separation(a) > 6.0]
    assert min(far_li) > 0.8  # Hirshfeld: the excess charge stays on Li⁺ far from the water

    data = tmp_path / "li_water.xyz"
    ase.io.write(data, labelled, format="extxyz")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labelled))
    test = [labelled[i] for i in sorted(order[:5])]
    ase.io.write(tmp_path / "test.xyz", test, format="extxyz")
    ase.io.write(tmp_path / "train.xyz", [labelled[i] for i in sorted(order[5:])], format="extxyz")
    backbone = {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "r_max": 4.0}
    predictions = {}
    for name in ("sr", "charges"):
        values = preset_config(
            name, labels={schema.CHARGES}, epochs=80, lr=0.03, backbone=backbone, batch_size=3
        )
        values["data"].update(train=str(tmp_path / "train.xyz"), test=str(tmp_path / "test.xyz"))
        values["output_dir"] = str(tmp_path / name)
        Trainer(parse_config(values)).run()
        predictions[name] = predict_frames(load_model(tmp_path / name / "model.safetensors"), test)
    table = long_range_table(test, predictions, cutoff=4.0)
    assert table["charges"]["fragment_charge_max_error"] < 0.1, table
    # 15 training structures: the far-field gain is real but smaller than the benchmark's (≤ 1/3)
    assert table["charges"]["far_energy_ratio"] < 0.8, table


@pytest.mark.slow
def test_split_captures_the_interaction_on_the_committed_cells(tmp_path):
    """On the benchmark's committed pw.x cells (no DFT run), ``split`` trained by its preset supplies
    most of the interaction energy between the fragments beyond the cutoff, which ``sr`` cannot: a
    recipe that lost the multipole supervision or the long-range energy would fail the ratio; with
    induced dipoles it supplies more (the water's polarisation by the ion). Measured on every far cell,
    training ones included: no fragment alone is ever trained on, so the interaction is a prediction in
    every cell."""
    from pathlib import Path

    from aiida_emlip.analysis.long_range import interaction_errors
    from aiida_emlip.extxyz import text_to_frames
    from aiida_emlip.models.io import load_model
    from aiida_emlip.training.config import parse_config
    from aiida_emlip.training.presets import preset_config
    from aiida_emlip.training.trainer import Trainer

    data = Path(__file__).resolve().parents[1] / "bench" / "data" / "long_range.xyz"
    frames = text_to_frames(data.read_text())
    labels = {k for a in frames for k in (*a.info, *a.arrays)}
    backbone = {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "r_max": 4.0}
    models = {}
    for name in ("sr", "split", "split+ind"):
        preset, _, variant = name.partition("+")
        values = preset_config(
            preset,
            labels=labels,
            epochs=40,
            elements=["H", "Li", "O"],
            backbone=backbone,
            batch_size=4,
            induction=variant == "ind",
        )
        values["data"].update(train=str(data), valid_fraction=0.1, test_fraction=0.0)
        values["output_dir"] = str(tmp_path / name)
        Trainer(parse_config(values)).run()
        models[name] = load_model(tmp_path / name / "model.safetensors")
    errors = interaction_errors(models, frames, cutoff=4.0)
    assert errors["sr"]["rms"] == pytest.approx(errors["reference"]["rms"])
    # measured 0.25 here, 0.26 with the benchmark's backbone (32 channels, 100 epochs)
    assert errors["split"]["rms"] < 0.5 * errors["sr"]["rms"], errors
    # induced dipoles supply the ion's polarisation of the water beyond the cutoff, which split lacks
    # (measured: sr 24.0, split 5.98, split with induced dipoles 3.42 meV/atom; base charges from the data)
    assert errors["split+ind"]["rms"] < 0.8 * errors["split"]["rms"], errors


def _train_fragment_modes(
    tmp_path, preset: str, modes=("integer", "shared"), extra: tuple[str, ...] = (), **options
) -> tuple[list[Atoms], dict]:
    """The committed cells (``long_range.xyz`` and the ``extra`` files of ``bench/data``) and ``preset``
    trained on all of them with each of the fragment ``modes`` (8 channels, 40 epochs), keyed by mode."""
    from pathlib import Path

    from aiida_emlip.extxyz import frames_to_text, text_to_frames
    from aiida_emlip.models.io import load_model
    from aiida_emlip.training.config import parse_config
    from aiida_emlip.training.presets import preset_config
    from aiida_emlip.training.trainer import Trainer

    folder = Path(__file__).resolve().parents[1] / "bench" / "data"
    frames = [a for name in ("long_range.xyz", *extra) for a in text_to_frames((folder / name).read_text())]
    data = tmp_path / "cells.xyz"
    data.write_text(frames_to_text(frames))
    labels = {k for a in frames for k in (*a.info, *a.arrays)}
    backbone = {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "r_max": 4.0}
    models = {}
    for mode in modes:
        values = preset_config(
            preset,
            labels=labels,
            epochs=40,
            elements=["H", "Li", "O"],
            backbone=backbone,
            batch_size=4,
            fragments=mode,
            **options,
        )
        values["data"].update(train=str(data), valid_fraction=0.1, test_fraction=0.0)
        values["output_dir"] = str(tmp_path / mode)
        Trainer(parse_config(values)).run()
        models[mode] = load_model(tmp_path / mode / "model.safetensors")
    return frames, models


def _ion_charges(model, frames: list[Atoms]) -> np.ndarray:
    """The charge ``model`` gives the first fragment (the ion) of each frame."""
    from aiida_emlip.models.calculator import EmlipCalculator

    charges = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = EmlipCalculator(model)
        charges.append(float(fragment_charges(atoms, atoms.get_charges())[0]))
    return np.array(charges)


@pytest.mark.slow
def test_integer_fragments_remove_the_charge_leak_on_the_committed_cells(tmp_path):
    """``charges`` with induced dipoles trained on the committed cells, fragments at integer charges
    against one structure-wide correction: that correction leaks part of the ion's charge onto the far
    water and the induced dipoles respond to it, binding the pair too strongly; integer fragments leave
    the dipoles the ion's field alone. Measured (every far cell, this backbone): 2.90 against 6.93
    meV/atom, mean +1.5 against −4.2. (Without induced dipoles the leak's spurious attraction stands in
    for the missing polarisation on the cells it was fitted to: 5.94 against 4.99.)"""
    from aiida_emlip.analysis.long_range import interaction_errors

    frames, models = _train_fragment_modes(tmp_path, "charges", induction=True)
    errors = interaction_errors(models, frames, cutoff=4.0)
    assert errors["integer"]["rms"] < 0.8 * errors["shared"]["rms"], errors
    assert abs(errors["integer"]["mean"]) < abs(errors["shared"]["mean"]), errors


@pytest.mark.slow
def test_one_mu_per_fragment_removes_the_leak_of_charge_equilibration(tmp_path):
    """``qeq`` trained by its preset on the committed cells, with one μ per fragment against the classic
    shared equilibration: the shared one leaks part of the ion's charge onto the far water (measured:
    the Li⁺ beyond 6 Å holds 0.83–0.88 e), per-fragment constraints keep it at +1 exactly, and the
    error of the far interaction energy falls from 21.3 to 6.0 meV/atom (24.0 is what ``sr`` misses;
    this backbone, 40 epochs)."""
    from aiida_emlip.analysis.long_range import interaction_errors

    frames, models = _train_fragment_modes(tmp_path, "qeq")
    far = [a for a in frames if a.info.get("total_charge") == 1.0 and separation(a) > 6.0]
    ion = {mode: _ion_charges(model, far) for mode, model in models.items()}
    np.testing.assert_allclose(ion["integer"], 1.0, atol=1e-8)
    assert np.abs(ion["shared"] - 1.0).min() > 0.05, ion
    errors = interaction_errors(models, frames, cutoff=4.0)
    assert errors["integer"]["rms"] < 0.5 * errors["shared"]["rms"], errors


@pytest.mark.slow
def test_bonds_follow_dft_at_contact_where_one_mu_per_fragment_overshoots(tmp_path):
    """``qeq`` (charge weight 100) trained on the committed cells with the Li⁺ contact cells, charge moving
    along bonds against one μ per fragment: on the contact cells at 3.0–3.8 Å, where the backbone barely
    sees the contact, one μ per fragment lets the Coulomb term alone move charge and gives the ion
    more than DFT; the bonds' conductances fade with the contact and follow DFT. Measured (this backbone,
    40 epochs): largest error of the ion's charge 0.045 against 0.147 e."""
    frames, models = _train_fragment_modes(
        tmp_path, "qeq", ("bonds", "integer"), ("long_range_Li_contact.xyz",), multipole_weights=(100.0,)
    )
    contact = [a for a in frames if a.info.get("total_charge") == 1.0 and 2.9 < separation(a) < 3.9]
    assert len(contact) >= 6
    dft = np.array([fragment_charges(a, a.arrays[schema.CHARGES])[0] for a in contact])
    errors = {mode: np.abs(_ion_charges(model, contact) - dft).max() for mode, model in models.items()}
    assert errors["bonds"] < 0.5 * errors["integer"], errors
    assert errors["bonds"] < 0.08, errors


def test_committed_fluoride_cells():
    """The benchmark's committed F⁻ + H₂O cells (pw.x, charged cell): total charge −1, F first,
    separations at contact, in 4–6 Å and beyond 8.5 Å; their Hirshfeld charges sum to −1 (the diffuse
    part of the excess electron far from every atom included), and beyond the cutoff the labels put
    0.15–0.18 e on the water (the excess electron is not all on F⁻ in this DFT)."""
    from pathlib import Path

    from aiida_emlip.extxyz import text_to_frames

    data = Path(__file__).resolve().parents[1] / "bench" / "data" / "long_range_F.xyz"
    frames = text_to_frames(data.read_text())
    separations = sorted(separation(atoms) for atoms in frames)
    assert separations[0] < 2.0 and separations[-1] > 8.5
    assert any(4.0 < s < 6.0 for s in separations)
    for atoms in frames:
        assert atoms.get_chemical_symbols() == ["F", "O", "H", "H"]
        assert atoms.info[schema.TOTAL_CHARGE] == -1.0
        assert np.isfinite(atoms.info[schema.ENERGY]) and atoms.arrays[schema.FORCES].shape == (4, 3)
        charges = atoms.arrays[schema.CHARGES]
        assert charges.sum() == pytest.approx(-1.0, abs=1e-3)
        fluorine, water = fragment_charges(atoms, charges)
        assert -1.0 < fluorine < -0.55 and -0.4 < water < 0.0
        if separation(atoms) > 4.0:
            assert -0.19 < water < -0.14


def test_committed_third_orientation_cells():
    """The benchmark's second file (a third random orientation of every separation of Li⁺ + H₂O and
    the water pair): 12 separations per system from contact to 9 Å, keys after the first file's,
    Hirshfeld charges that sum to the total charge, Li⁺ whole beyond 6 Å and below +0.8 e at contact
    (charge transfer into the water), the water pair neutral fragment by fragment beyond 4 Å."""
    from pathlib import Path

    from aiida_emlip.extxyz import text_to_frames

    folder = Path(__file__).resolve().parents[1] / "bench" / "data"
    first = text_to_frames((folder / "long_range.xyz").read_text())
    frames = text_to_frames((folder / "long_range_more.xyz").read_text())
    assert len(frames) == 24
    keys = [atoms.info["key"] for atoms in first + frames]
    assert len(set(keys)) == len(keys)
    for system, charge in (("Li", 1.0), ("H2O", 0.0)):
        cells = [a for a in frames if a.info[schema.TOTAL_CHARGE] == charge]
        assert len(cells) == 12, system
        separations = sorted(separation(atoms) for atoms in cells)
        assert separations[0] < 2.0 and separations[-1] > 8.5 and sum(4.0 < s < 6.0 for s in separations) >= 3
        for atoms in cells:
            assert np.isfinite(atoms.info[schema.ENERGY]) and np.isfinite(atoms.arrays[schema.FORCES]).all()
            charges = atoms.arrays[schema.CHARGES]
            assert charges.sum() == pytest.approx(charge, abs=1e-3)
            head, _ = fragment_charges(atoms, charges)
            if system == "Li" and separation(atoms) > 6.0:
                assert head == pytest.approx(1.0, abs=0.005)
            if system == "Li" and separation(atoms) < 2.0:
                assert head < 0.8
            if system == "H2O" and separation(atoms) > 4.0:
                assert abs(head) < 0.005


def test_committed_contact_cells():
    """The benchmark's third file: 18 water pairs at contact (1.8–3.8 Å, six separations, three new
    orientations each), keys after the other two files', neutral cells whose Hirshfeld charges sum to
    zero, each water keeping its neutrality within the 0.1 e that a hydrogen bond moves, and the
    energies spread by the pair's orientation (repulsive and bound contacts both sampled)."""
    from pathlib import Path

    from aiida_emlip.extxyz import text_to_frames

    folder = Path(__file__).resolve().parents[1] / "bench" / "data"
    earlier = [
        a
        for name in ("long_range.xyz", "long_range_more.xyz")
        for a in text_to_frames((folder / name).read_text())
    ]
    frames = text_to_frames((folder / "long_range_contact.xyz").read_text())
    assert len(frames) == 18
    keys = [atoms.info["key"] for atoms in earlier + frames]
    assert len(set(keys)) == len(keys)
    separations = [separation(atoms) for atoms in frames]
    assert sorted({round(s, 1) for s in separations}) == [1.8, 2.2, 2.6, 3.0, 3.4, 3.8]
    energies = []
    for atoms in frames:
        assert atoms.get_chemical_symbols() == ["O", "H", "H", "O", "H", "H"]
        assert atoms.info[schema.TOTAL_CHARGE] == 0.0
        assert np.isfinite(atoms.arrays[schema.FORCES]).all()
        charges = atoms.arrays[schema.CHARGES]
        assert charges.sum() == pytest.approx(0.0, abs=1e-3)
        first, second = fragment_charges(atoms, charges)
        assert abs(first) < 0.1 and first == pytest.approx(-second, abs=1e-3)
        energies.append(atoms.info[schema.ENERGY])
    assert 0.1 < max(energies) - min(energies) < 1.0
    # none of them repeats a cell of the scan: other orientations, not copies
    scan = {round(a.info[schema.ENERGY], 4) for a in earlier if a.info[schema.TOTAL_CHARGE] == 0.0}
    assert not scan & {round(e, 4) for e in energies}


def test_committed_li_contact_cells():
    """The benchmark's Li⁺ contact file (``--train-extra``): 18 cells of Li⁺ + H₂O at 1.8–3.8 Å (six
    separations, three new orientations each), keys after the three default files', a charged cell
    whose Hirshfeld charges sum to +1, and the charge transfer of DFT at contact: the water gives the
    ion more charge the nearer it is (Li below +0.9 e at 1.8 Å, above +0.95 e at 3.8 Å)."""
    from pathlib import Path

    from aiida_emlip.extxyz import text_to_frames

    folder = Path(__file__).resolve().parents[1] / "bench" / "data"
    earlier = [
        a
        for name in ("long_range.xyz", "long_range_more.xyz", "long_range_contact.xyz")
        for a in text_to_frames((folder / name).read_text())
    ]
    frames = text_to_frames((folder / "long_range_Li_contact.xyz").read_text())
    assert len(frames) == 18
    keys = [atoms.info["key"] for atoms in earlier + frames]
    assert len(set(keys)) == len(keys)
    assert sorted({round(separation(a), 1) for a in frames}) == [1.8, 2.2, 2.6, 3.0, 3.4, 3.8]
    ion = {}
    for atoms in frames:
        assert atoms.get_chemical_symbols() == ["Li", "O", "H", "H"]
        assert atoms.info[schema.TOTAL_CHARGE] == 1.0
        assert np.isfinite(atoms.info[schema.ENERGY]) and np.isfinite(atoms.arrays[schema.FORCES]).all()
        charges = atoms.arrays[schema.CHARGES]
        assert charges.sum() == pytest.approx(1.0, abs=1e-3)
        ion.setdefault(round(separation(atoms), 1), []).append(fragment_charges(atoms, charges)[0])
    assert max(ion[1.8]) < 0.9 and min(ion[3.8]) > 0.95
    assert np.mean(ion[1.8]) < np.mean(ion[2.6]) < np.mean(ion[3.8])
    # none of them repeats a cell of the scan
    scan = {round(a.info[schema.ENERGY], 4) for a in earlier if a.info[schema.TOTAL_CHARGE] == 1.0}
    assert not scan & {round(a.info[schema.ENERGY], 4) for a in frames}


def test_extra_training_cells_leave_the_held_out_cells_alone(tmp_path):
    """``--train-extra``: the extra cells join the training set only; the held-out cells are those of
    the split without them, so that figures with and without them compare on the same cells."""
    import sys
    from pathlib import Path

    from aiida_emlip.extxyz import text_to_frames

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_long_range import DEFAULT_DATA, LI_CONTACT, split_data

    plain = split_data(DEFAULT_DATA, tmp_path / "plain", seed=0)
    extra = split_data(DEFAULT_DATA, tmp_path / "extra", seed=0, extra=[LI_CONTACT])
    assert plain[1].read_text() == extra[1].read_text()
    keys = [[a.info["key"] for a in text_to_frames(path.read_text())] for path in (plain[0], extra[0])]
    added = [a.info["key"] for a in text_to_frames(LI_CONTACT.read_text())]
    assert len(keys[0]) == 72 and keys[1] == keys[0] + added
    held_out = {a.info["key"] for a in text_to_frames(plain[1].read_text())}
    assert len(held_out) == 18 and not held_out & set(keys[1])


def test_design_names_set_the_fragments_option_of_the_preset():
    """``qeq~finteger`` trains ``qeq`` with one constraint per fragment; a preset whose head has no such
    option refuses it rather than training something else than asked."""
    import sys
    from pathlib import Path

    from aiida_emlip.training.presets import preset_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_long_range import _variant

    design = _variant("functional~mp30~finteger")
    assert (design.preset, design.multipole_weights, design.fragments) == ("functional", (30.0,), "integer")
    assert _variant("qeq").fragments is None
    assert _variant("split+ind~vlast") == ("split", True, None, None, None, True)
    assert _variant("charges~w2~vearly").last_layer_vectors is False
    assert _variant("charges").last_layer_vectors is None
    with pytest.raises(ValueError, match="expected one of ~vlast, ~vearly"):
        _variant("split~vfirst")
    head = preset_config("qeq", fragments="integer")["model"]["head"]
    assert head == {"name": "qeq", "fragments": "integer"}
    assert "fragments" not in preset_config("qeq")["model"]["head"]  # the classic, shared equilibration
    functional = preset_config("functional")["model"]
    assert functional["head"]["fragments"] == "bonds" and functional["electrostatics"] == {"sigma": 1.0}
    assert preset_config("functional", fragments="shared")["model"]["head"]["fragments"] == "shared"
    with pytest.raises(ValueError, match="has no fragments option"):
        preset_config("sr", fragments="integer")
    # the presets' list (kept free of torch) names exactly the heads whose options have the field
    from dataclasses import fields

    from aiida_emlip.models.heads import HEADS
    from aiida_emlip.training.presets import FRAGMENT_HEADS, PRESETS

    with_option = {name for name in PRESETS if "fragments" in {f.name for f in fields(HEADS[name].Options)}}
    assert set(FRAGMENT_HEADS) == with_option
