"""Vacancy supercells in several charge states, built with pymatgen-analysis-defects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from pymatgen.analysis.defects.generators import VacancyGenerator
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from .records import tag

#: α-quartz (P3_221, No. 154): experimental lattice (Å) and Wyckoff positions Si 3a (x, 0, 2/3), O 6c.
QUARTZ_A = 4.916
QUARTZ_C = 5.405
QUARTZ_SITES = {"Si": (0.4697, 0.0, 2.0 / 3.0), "O": (0.4135, 0.2669, 0.1191 + 2.0 / 3.0)}


def alpha_quartz(a: float = QUARTZ_A, c: float = QUARTZ_C) -> Atoms:
    """Return the 9-atom conventional cell of α-quartz SiO2."""
    structure = Structure.from_spacegroup(
        154, Lattice.hexagonal(a, c), list(QUARTZ_SITES), [list(v) for v in QUARTZ_SITES.values()]
    )
    return AseAtomsAdaptor.get_atoms(structure)


def vacancy_supercells(
    atoms: Atoms,
    element: str,
    charges: Sequence[int] = (0,),
    supercell: Sequence[int] | None = None,
    min_length: float = 8.0,
    rattle: float = 0.0,
    seed: int = 0,
) -> list[Atoms]:
    """Return one supercell per symmetry-distinct ``element`` vacancy and charge state in ``charges``.

    ``supercell`` is a diagonal repeat (default: pymatgen-analysis-defects picks the smallest
    supercell whose shortest length is at least ``min_length`` Å). ``rattle`` (Å, seeded) breaks
    symmetry so that the relaxation around the vacancy can start.
    """
    structure = AseAtomsAdaptor.get_structure(atoms)
    rng = np.random.default_rng(seed)
    frames = []
    vacancies = list(VacancyGenerator().generate(structure, rm_species=[element]))
    if not vacancies:
        raise ValueError(f"no {element} site in the structure")
    for v_index, vacancy in enumerate(vacancies):
        if supercell is not None:
            defect = vacancy.get_supercell_structure(sc_mat=np.diag(supercell))
        else:
            defect = vacancy.get_supercell_structure(min_length=min_length, min_atoms=1, max_atoms=400)
        base = AseAtomsAdaptor.get_atoms(defect)
        for charge in charges:
            frame = base.copy()
            if rattle > 0:
                frame.positions = frame.positions + rng.normal(0.0, rattle, size=frame.positions.shape)
            params = {
                "element": element,
                "vacancy": v_index,
                "supercell": list(supercell or []),
                "rattle": rattle,
            }
            frames.append(
                tag(
                    frame,
                    "vacancy",
                    seed,
                    index=len(frames),
                    params=params,
                    total_charge=float(charge),
                    config_type=f"V_{element}{charge:+d}",
                )
            )
    return frames


def quartz_oxygen_vacancy(
    charges: Sequence[int] = (0, 1, 2), supercell: Sequence[int] = (1, 1, 1), seed: int = 0
) -> list[Atoms]:
    """Return the oxygen vacancy of α-quartz SiO2 in ``charges`` (the study's defect), one per charge."""
    return vacancy_supercells(alpha_quartz(), "O", charges=charges, supercell=supercell, seed=seed)
