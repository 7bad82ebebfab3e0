"""Reuse of a finished dataset workchain whose inputs were the same.

AiiDA's cache hands out finished *calculations* again, never workchains; a dataset workchain relaunched
on the same inputs would still create one label workchain, one ``PwBaseWorkChain`` and one cached
calculation per configuration, and that bookkeeping is what a rerun spends its time on. When caching
is enabled for the dataset workchain's own identifier (``aiida.workflows:emlip.dataset``, which
``aiida-emlip launch`` and ``demo`` enable with the calculations), the workchain looks for a finished
one with the same inputs and returns that one's outputs instead: the same dataset node, linked as an
output of the new workchain, so the provenance graph shows where every label came from.

"The same inputs" is a digest (:func:`inputs_digest`) of the hashes AiiDA's cache uses for each input
node (content, not identity), the pseudopotentials of the family (a family is a group whose content
can change under its label), the package version and :data:`DATASET_REVISION`. Only a source that is
still a valid cache qualifies: finished OK, sealed, not invalidated
(``node.base.caching.is_valid_cache = False`` on the workchain or on any of its calculations excludes
it), its outputs present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiida import orm
from aiida.common.links import LinkType

from aiida_emlip import __version__

#: Raised when the dataset workchain's outputs change for the same inputs within one version (2: the
#: Hirshfeld partition gives density far from every atom to the nearest atom).
DATASET_REVISION = 2
#: Extra of every dataset workchain: the digest of its inputs.
DIGEST_EXTRA = "emlip_inputs_digest"
#: Extra of a dataset workchain that reused another: that one's UUID.
REUSED_FROM_EXTRA = "emlip_reused_from"
#: Inputs that do not change the result (how many configurations run at once).
NEUTRAL_INPUTS = frozenset({"max_concurrent"})


def _flatten(inputs: Mapping[str, Any], prefix: str = "") -> dict[str, orm.Node]:
    """``{dotted port name: node}`` of a (nested) mapping of inputs, ``metadata`` left out."""
    out: dict[str, orm.Node] = {}
    for name, value in inputs.items():
        if name == "metadata" or (not prefix and name in NEUTRAL_INPUTS):
            continue
        key = f"{prefix}{name}"
        if isinstance(value, orm.Node):
            out[key] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{key}."))
    return out


def inputs_digest(inputs: Mapping[str, Any], pseudos_md5: Mapping[str, str]) -> str:
    """A digest of what decides a dataset workchain's outputs (see the module's docstring)."""
    hashes = {name: node.base.caching.compute_hash() for name, node in _flatten(inputs).items()}
    if any(value is None for value in hashes.values()):
        unhashable = sorted(name for name, value in hashes.items() if value is None)
        raise ValueError(f"inputs without a hash: {', '.join(unhashable)}")
    payload = {
        "inputs": hashes,
        "pseudos_md5": dict(pseudos_md5),
        "version": __version__,
        "revision": DATASET_REVISION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _calculations(node: orm.ProcessNode) -> Iterable[orm.CalcJobNode]:
    return (n for n in node.called_descendants if isinstance(n, orm.CalcJobNode))


def usable(node: orm.ProcessNode) -> bool:
    """Whether ``node``'s outputs may stand for a new run: it and the workchain that ran its calculations
    (itself, or the one it reused) are valid caches, and so are those calculations."""
    source = origin(node)
    if not (node.base.caching.is_valid_cache and source.base.caching.is_valid_cache):
        return False
    if "report" not in node.outputs:
        return False
    return all(calc.base.caching.is_valid_cache for calc in _calculations(source))


def finished_twin(process_type: str, digest: str, exclude: int) -> orm.WorkflowNode | None:
    """The oldest usable finished workchain of ``process_type`` with inputs digest ``digest``."""
    query = orm.QueryBuilder().append(
        orm.WorkflowNode,
        filters={
            "process_type": process_type,
            f"extras.{DIGEST_EXTRA}": digest,
            "attributes.process_state": "finished",
            "attributes.exit_status": 0,
            "id": {"!==": exclude},
        },
        project="*",
    )
    query.order_by({orm.WorkflowNode: {"ctime": "asc"}})
    for (node,) in query.iterall():
        if usable(node):
            return node
    return None


def origin(node: orm.ProcessNode) -> orm.ProcessNode:
    """The workchain that ran the calculations of ``node``: ``node`` itself, or the one it reused."""
    uuid = node.base.extras.get(REUSED_FROM_EXTRA, None)
    return orm.load_node(uuid) if uuid else node


def returned(node: orm.ProcessNode) -> dict[str, orm.Data]:
    """``{output port (dotted): node}`` of every output ``node`` returned."""
    links = node.base.links.get_outgoing(link_type=LinkType.RETURN).all()
    return {link.link_label.replace("__", "."): link.node for link in links}


def reused_counts(node: orm.ProcessNode, descendants: list[orm.ProcessNode] | None = None) -> tuple[int, int]:
    """(workchains that reused a finished twin — ``node`` or below it —, calculations those twins ran).

    ``descendants``: ``node.called_descendants`` when the caller has them already.
    """
    nodes = [node, *(node.called_descendants if descendants is None else descendants)]
    twins = [n for n in nodes if n.base.extras.get(REUSED_FROM_EXTRA, None)]
    calcs = sum(sum(1 for _ in _calculations(origin(n))) for n in twins)
    return len(twins), calcs
