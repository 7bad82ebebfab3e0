"""Sampler recipes: a name and keyword arguments for a plain function of :mod:`aiida_emlip.structures`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ase import Atoms

from aiida_emlip import structures


def _md(atoms: Atoms, calculator: str = "emt", **kwargs: Any) -> list[Atoms]:
    if calculator != "emt":
        raise ValueError(f"recipe calculator {calculator!r}: only 'emt' is available in a recipe")
    from ase.calculators.emt import EMT

    return structures.md_snapshots(atoms, EMT(), **kwargs)


def _interface(**kwargs: Any) -> list[Atoms]:
    return [structures.metal_water_interface(**kwargs)]


#: name -> (function, or the name of one in :mod:`aiida_emlip.structures`; needs a base structure).
#: Names are resolved on use, so that importing the workchains does not load pymatgen (a second of
#: start-up for every process and daemon worker), which only the defect samplers need.
SAMPLERS: dict[str, tuple[Callable[..., list[Atoms]] | str, bool]] = {
    "rattle": ("rattle", True),
    "strain": ("strain", True),
    "vacancy": ("vacancy_supercells", True),
    "quartz_oxygen_vacancy": ("quartz_oxygen_vacancy", False),
    "metal_water_interface": (_interface, False),
    "ion_slab_scan": ("ion_slab_scan", True),
    "fragment_pair_scan": ("fragment_pair_scan", False),
    "md": (_md, True),
}


def run_recipe(recipe: dict[str, Any], atoms: Atoms | None = None) -> list[Atoms]:
    """Run ``recipe = {"name": ..., "kwargs": {...}}``, on ``atoms`` when the sampler needs a structure."""
    unknown = sorted(set(recipe) - {"name", "kwargs"})
    if unknown:
        raise ValueError(f"unknown recipe key(s) {unknown}; allowed: name, kwargs")
    name = recipe.get("name")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}")
    function, needs_structure = SAMPLERS[name]
    if isinstance(function, str):
        function = getattr(structures, function)
    kwargs = dict(recipe.get("kwargs") or {})
    if needs_structure:
        if atoms is None:
            raise ValueError(f"sampler {name!r} needs a base structure")
        return function(atoms, **kwargs)
    return function(**kwargs)
