"""Install the ld1.x family as an aiida-pseudo ``CutoffsPseudoPotentialFamily``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from aiida import orm
from aiida.plugins import DataFactory, GroupFactory

from .generate import ELEMENTS, UPF_SUFFIX, UnknownElementError, generate_family, recommended_cutoffs

__all__ = ("FAMILY_LABEL", "check_elements", "family_elements", "install_family", "load_family")

#: Label of the installed family; bump the version when any ld1.x input changes.
FAMILY_LABEL = "emlip-ld1-pbe-v1"
FAMILY_DESCRIPTION = (
    "aiida-emlip offline PBE family generated with ld1.x (Quantum ESPRESSO 6.7); "
    "cutoffs measured with pw.x (1 mRy/atom)"
)
STRINGENCY = "normal"
UNIT = "Ry"


def load_family(label: str = FAMILY_LABEL) -> orm.Group:
    """Return the pseudopotential family (any aiida-pseudo family class) with ``label``."""
    family_cls = GroupFactory("pseudo.family")
    return family_cls.collection.get(label=label)


def _find(label: str) -> orm.Group | None:
    family_cls = GroupFactory("pseudo.family")
    matches = family_cls.collection.find(filters={"label": label})
    return matches[0] if matches else None


def install_family(
    directory: Path, label: str = FAMILY_LABEL, elements: Iterable[str] | None = None, ld1: str = "ld1.x"
) -> orm.Group:
    """Install the family from the UPF files in ``directory`` (generated there if missing).

    Idempotent: an existing group with ``label`` is returned unchanged. Otherwise a
    ``CutoffsPseudoPotentialFamily`` (entry point ``pseudo.family.cutoffs``) of ``UpfData`` nodes is
    stored with the measured cutoffs as stringency ``normal`` in Ry.
    """
    existing = _find(label)
    if existing is not None:
        return existing
    wanted = list(ELEMENTS if elements is None else elements)
    paths = {}
    directory = Path(directory)
    for element in wanted:
        path = directory / f"{element}{UPF_SUFFIX}"
        if not path.is_file():
            path = generate_family(directory, [element], ld1=ld1)[element]
        paths[element] = path
    upf_cls = DataFactory("pseudo.upf")
    nodes = []
    for element, path in paths.items():
        node = upf_cls(path.resolve(), filename=path.name)
        if node.element != element:
            raise ValueError(f"{path} holds element {node.element}, expected {element}")
        nodes.append(node)
    family_cls = GroupFactory("pseudo.family.cutoffs")
    family = family_cls(label=label, description=FAMILY_DESCRIPTION)
    family.store()
    family.add_nodes([node.store() for node in nodes])
    cutoffs = {}
    for element in wanted:
        wfc, rho = recommended_cutoffs(element)
        cutoffs[element] = {"cutoff_wfc": wfc, "cutoff_rho": rho}
    family.set_cutoffs(cutoffs, stringency=STRINGENCY, unit=UNIT)
    return family


def family_elements(label: str = FAMILY_LABEL) -> list[str]:
    """Return the sorted element symbols of the installed family ``label``."""
    return sorted(load_family(label).elements)


def check_elements(label: str, elements: Iterable[str]) -> None:
    """Raise :class:`UnknownElementError`, listing the available ones, unless ``label`` has ``elements``."""
    available = family_elements(label)
    missing = [el for el in elements if el not in available]
    if missing:
        raise UnknownElementError(missing, available, family=label)
