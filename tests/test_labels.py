"""One label reader: the ``emlip.dataset`` node and the trainer read the same labels from one file.

The file holds stress in both forms a user meets: 3×3 (9 values, the extxyz convention) and Voigt
(6 values ``xx yy zz yz xz xy``, refused by ASE's reader alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from aiida_emlip import schema
from aiida_emlip.extxyz import read_frames, stress_matrix
from aiida_emlip.training.config import DataConfig
from aiida_emlip.training.data import load_samples, to_sample

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The symmetric stress both frames hold (eV/Å^3), and its Voigt form xx yy zz yz xz xy.
STRESS = np.array([[0.01, 0.06, 0.05], [0.06, 0.02, 0.04], [0.05, 0.04, 0.03]])
VOIGT = "0.01 0.02 0.03 0.04 0.05 0.06"
FULL = " ".join(f"{v:g}" for v in STRESS.reshape(9))

PROPERTIES = "species:S:1:pos:R:3:forces:R:3:ref_charges:R:1:ref_dipoles:R:3"
ROWS = (
    "Na 0.0 0.0 0.0  0.10 -0.20 0.30  0.80  0.01 0.02 0.03",
    "Cl 2.8 0.0 0.0 -0.10  0.20 -0.30 -0.30 -0.01 -0.02 -0.03",
)
#: Per frame: (energy, total_charge, dipole, stress as written).
FRAMES = ((-10.5, 0.5, "0.1 0.2 0.3", FULL), (-11.25, -1.0, "-0.3 0.0 0.7", VOIGT))


def _write(path: Path) -> Path:
    lines = []
    for energy, charge, dipole, stress in FRAMES:
        lines += [
            "2",
            f'Lattice="5.6 0 0 0 5.6 0 0 0 5.6" Properties={PROPERTIES} energy={energy} '
            f'stress="{stress}" dipole="{dipole}" total_charge={charge} pbc="T T T"',
            *ROWS,
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _expected(index: int) -> dict[str, np.ndarray]:
    energy, charge, dipole, _ = FRAMES[index]
    table = np.array([[float(x) for x in row.split()[1:]] for row in ROWS])
    return {
        schema.ENERGY: np.array(energy),
        schema.FORCES: table[:, 3:6],
        schema.STRESS: STRESS,
        schema.CHARGES: table[:, 6],
        schema.ATOMIC_DIPOLES: table[:, 7:10],
        schema.DIPOLE: np.array([float(x) for x in dipole.split()]),
        schema.TOTAL_CHARGE: np.array(charge),
    }


def _node_labels(atoms: Atoms) -> dict[str, np.ndarray]:
    values = {**atoms.info, **atoms.arrays}
    return {key: np.asarray(values[key], dtype=float) for key in _expected(0)}


def test_dataset_node_and_trainer_read_the_same_labels(aiida_profile, tmp_path):
    from aiida_emlip.data import EmlipDatasetData

    path = _write(tmp_path / "labels.xyz")
    node = EmlipDatasetData.from_extxyz(path)
    assert node.n_configurations == 2
    frames = node.to_ase()
    samples = load_samples(path, DataConfig(train=str(path)))
    assert len(frames) == len(samples) == 2
    for index, (atoms, sample) in enumerate(zip(frames, samples)):
        expected = _expected(index)
        from_node = _node_labels(atoms)
        from_trainer = {**sample.labels, schema.TOTAL_CHARGE: np.array(sample.total_charge)}
        assert set(from_trainer) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(from_node[key], value, rtol=0, atol=1e-12, err_msg=key)
            np.testing.assert_allclose(from_trainer[key], value, rtol=0, atol=1e-12, err_msg=key)
            assert from_node[key].shape == from_trainer[key].shape == value.shape, key
        assert sample.atoms.info[schema.TOTAL_CHARGE] == FRAMES[index][1]
    # the node stores the Voigt stress as its 3×3 matrix: the stored file reads the same again
    again = read_frames(node.export(tmp_path / "stored.xyz"))
    np.testing.assert_allclose(again[1].info[schema.STRESS], STRESS, rtol=0, atol=1e-12)
    assert 'stress="0.01 0.06 0.05 0.06 0.02 0.04 0.05 0.04 0.03"' in node.get_text()


def test_calculator_and_mapped_keys_give_the_same_stress(aiida_profile):
    """Voigt in a calculator (what ASE holds), in ``atoms.info`` and under a mapped file key."""
    from aiida_emlip.data import EmlipDatasetData

    voigt = np.array([float(x) for x in VOIGT.split()])
    atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]], cell=np.eye(3) * 5.6, pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-3.0, forces=np.zeros((2, 3)), stress=voigt)
    (stored,) = EmlipDatasetData.from_ase([atoms]).to_ase()
    sample = to_sample(atoms, 0, DataConfig(train="x"), "test")
    np.testing.assert_allclose(stored.info[schema.STRESS], STRESS, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sample.labels[schema.STRESS], STRESS, rtol=0, atol=1e-15)

    plain = Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]], cell=np.eye(3) * 5.6, pbc=True)
    plain.info[schema.STRESS] = voigt
    (stored,) = EmlipDatasetData.from_ase([plain]).to_ase()
    np.testing.assert_allclose(stored.info[schema.STRESS], STRESS, rtol=0, atol=1e-15)
    mapped = Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]], cell=np.eye(3) * 5.6, pbc=True)
    mapped.info["REF_stress"] = voigt
    sample = to_sample(mapped, 0, DataConfig(train="x", keys={"stress": "REF_stress"}), "test")
    np.testing.assert_allclose(sample.labels[schema.STRESS], STRESS, rtol=0, atol=1e-15)


def test_stress_matrix_and_bad_sizes(tmp_path):
    np.testing.assert_array_equal(stress_matrix([1, 2, 3, 4, 5, 6]), [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
    np.testing.assert_array_equal(stress_matrix(np.arange(9.0)), np.arange(9.0).reshape(3, 3))
    with pytest.raises(ValueError, match="6 \\(Voigt\\) or 9"):
        stress_matrix([1.0, 2.0, 3.0])
    bad = tmp_path / "bad.xyz"
    bad.write_text('1\nProperties=species:S:1:pos:R:3 dipole="1 2" pbc="F F F"\nH 0 0 0\n')
    with pytest.raises(ValueError, match="structure 0: 'dipole' has 2 value"):
        read_frames(bad)


def test_one_reader_and_one_voigt_conversion():
    """No second extxyz label reader or Voigt conversion hides in the package."""
    sources = {
        path.relative_to(REPO_ROOT).as_posix(): path.read_text()
        for path in (REPO_ROOT / "aiida_emlip").rglob("*.py")
    }
    assert "aiida_emlip/data/extxyz.py" not in sources
    for needle in ("voigt_6_to_full_3x3", "yz, xz, xy", "calc.results.items()", "ase.io.read("):
        holders = sorted(name for name, text in sources.items() if needle in text)
        assert holders in ([], ["aiida_emlip/extxyz.py"]), (needle, holders)
