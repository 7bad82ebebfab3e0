"""Vacancy supercells in several charge states, built with pymatgen-analysis-defects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class VacancyCells:
    """A pristine supercell and the same supercell with one atom removed (identical geometry otherwise).

    ``defect`` holds the atoms of ``pristine`` except ``site`` (a supercell index), in the same order;
    ``position`` is the removed atom's Cartesian position (Å) and ``repeat`` the diagonal supercell.
    """

    pristine: Atoms
    defect: Atoms
    site: int
    position: np.ndarray
    repeat: tuple[int, int, int]
    element: str

    def pristine_index(self, defect_index: int) -> int:
        """Index in ``pristine`` of atom ``defect_index`` of ``defect``."""
        return defect_index if defect_index < self.site else defect_index + 1


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell (Å), one per lattice vector."""
    cell = np.asarray(cell, dtype=float)
    volume = abs(np.linalg.det(cell))
    return volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)


def supercell_repeat(atoms: Atoms, min_length: float) -> tuple[int, int, int]:
    """Smallest diagonal repeat whose three perpendicular widths are all at least ``min_length`` Å."""
    widths = perpendicular_widths(atoms.cell[:])
    repeat = [max(1, int(np.ceil(min_length / w - 1e-9))) for w in widths]
    return int(repeat[0]), int(repeat[1]), int(repeat[2])


def vacancy_site(atoms: Atoms, element: str, site: int | None = None) -> int:
    """Index in ``atoms`` of the atom to remove: ``site`` (checked) or the first ``element`` atom.

    :raises ValueError: ``element`` absent from ``atoms``, or ``site`` out of range or of another element.
    """
    symbols = atoms.get_chemical_symbols()
    if element not in symbols:
        raise ValueError(f"no {element} atom in the host ({', '.join(sorted(set(symbols)))})")
    if site is None:
        return symbols.index(element)
    if not 0 <= site < len(symbols):
        raise ValueError(f"site {site} out of range: the host has {len(symbols)} atoms")
    if symbols[site] != element:
        raise ValueError(f"site {site} is {symbols[site]}, not {element}")
    return int(site)


def vacancy_cells(
    atoms: Atoms,
    element: str,
    site: int | None = None,
    supercell: Sequence[int] | None = None,
    min_length: float = 10.0,
) -> VacancyCells:
    """Return the pristine supercell of ``atoms`` and the same supercell without one ``element`` atom.

    ``site`` indexes ``atoms`` (default: its first ``element`` atom); the removed atom is that site's
    image in the first cell of the supercell. ``supercell`` is a diagonal repeat (default: the smallest
    whose perpendicular widths are ≥ ``min_length`` Å).

    :raises ValueError: as :func:`vacancy_site`, or a repeat that is not three positive integers.
    """
    index = vacancy_site(atoms, element, site)
    if supercell is None:
        repeat: tuple[int, ...] = supercell_repeat(atoms, min_length)
    else:
        repeat = tuple(int(n) for n in supercell)
    if len(repeat) != 3 or any(n < 1 for n in repeat):
        raise ValueError(f"supercell must be three positive integers, got {list(repeat)}")
    host = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=True)
    pristine = host.repeat(repeat)  # ASE keeps the first cell's atoms first, in order
    defect = pristine.copy()
    position = np.array(pristine.positions[index], dtype=float)
    del defect[index]
    return VacancyCells(pristine, defect, index, position, (repeat[0], repeat[1], repeat[2]), element)
