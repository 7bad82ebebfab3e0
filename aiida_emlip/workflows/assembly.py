"""The dataset's final assembly in parts: a cost linear in the number of configurations.

When aiida-core links the inputs of a process, it checks each new link against every link already made,
and a ``Dict`` compares by content (``Dict.__eq__`` reads both nodes' attributes), so a calcfunction with
one ``output_parameters`` per configuration among its inputs costs a time quadratic in their number:
measured on an empty calcfunction with a structure, a ``Dict`` and a trajectory per configuration, 1.2 s
for 12 configurations, 20 s for 100 and 71 s for 200 (14 s for 200 without the ``Dict``\\ s). Linked
last (:func:`_inputs`), the ``Dict`` inputs meet only each other, which cuts the quadratic term but
leaves it.

:func:`assemble` therefore runs :func:`~aiida_emlip.workflows.functions.assemble_dataset` on consecutive
parts of at most :data:`ASSEMBLY_PART` configurations and joins the parts with :func:`merge_datasets`,
whose inputs are one dataset per part. With at most :data:`ASSEMBLY_PART` configurations it is one
``assemble_dataset``, as before. The dataset is the same either way, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiida import orm
from aiida.engine import calcfunction

from aiida_emlip.data import EmlipDatasetData

from .functions import assemble_dataset, assembly_outputs

#: Configurations per ``assemble_dataset`` call (its cost grows as the square of this number).
ASSEMBLY_PART = 32


@calcfunction
def merge_datasets(settings: orm.Dict, **parts: EmlipDatasetData) -> dict[str, orm.Data]:
    """The datasets that ``assemble_dataset`` made of parts of the configurations, joined in the order of
    ``settings`` (``order``, else that of ``configurations``), and the failure report of the whole run."""
    data = settings.get_dict()
    rank = {key: index for index, key in enumerate(data.get("order") or list(data["configurations"]))}
    frames = [atoms for name in sorted(parts) for atoms in parts[name].to_ase()]
    frames.sort(key=lambda atoms: rank[str(atoms.info["key"])])
    return assembly_outputs(data, frames)


def assemble(
    settings: dict[str, Any], labels: Mapping[str, Mapping[str, orm.Data]], part: int = ASSEMBLY_PART
) -> dict[str, orm.Data]:
    """The dataset and report of the configurations ``labels`` (``{key: {"structure": ..., "parameters":
    ..., ...}}``, the finished ones) under ``settings`` (those of ``assemble_dataset``): one
    ``assemble_dataset`` for at most ``part`` configurations, else one per part and their merge."""
    order = settings.get("order") or list(settings["configurations"])
    keys = [key for key in order if key in labels]
    if len(keys) <= part:
        return assemble_dataset(settings=orm.Dict(settings), **_inputs(labels, keys))
    parts = {}
    for index, start in enumerate(range(0, len(keys), part)):
        chunk = keys[start : start + part]
        within = set(chunk)
        sub = {
            **settings,
            "configurations": {key: settings["configurations"][key] for key in chunk},
            "order": chunk,
            "failures": {},
        }
        for name in ("postprocess_failures", "postprocess_skipped"):
            sub[name] = {k: v for k, v in (settings.get(name) or {}).items() if k in within}
        outputs = assemble_dataset(settings=orm.Dict(sub), **_inputs(labels, chunk))
        parts[f"part_{index:04d}"] = outputs["dataset"]
    return merge_datasets(settings=orm.Dict(settings), **parts)


def _inputs(labels: Mapping[str, Mapping[str, orm.Data]], keys: list[str]) -> dict[str, orm.Data]:
    """The calcfunction's inputs of the configurations ``keys``, the ``Dict`` nodes last: aiida-core
    compares each new input link with every link made before it, as ``earlier == new``, and where the
    earlier input is a ``Dict`` (which compares by content) that reads both nodes from the database, so
    each ``Dict`` placed last is compared with the other ``Dict`` nodes only."""
    nodes = {f"{name}_{key}": node for key in keys for name, node in labels[key].items()}
    return dict(sorted(nodes.items(), key=lambda item: isinstance(item[1], orm.Dict)))
