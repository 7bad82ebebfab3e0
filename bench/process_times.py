"""Wall times of finished AiiDA processes for the benchmarks: spans of process nodes and their steps."""

from __future__ import annotations

from typing import Any


def span(nodes) -> float:
    """Seconds from the first creation to the last change among ``nodes`` (None entries ignored)."""
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        return 0.0
    return (max(n.mtime for n in nodes) - min(n.ctime for n in nodes)).total_seconds()


def called_by_label(node) -> dict[str, Any]:
    """The processes ``node`` called (workflows and calculations), by their call link label."""
    from aiida.common.links import LinkType

    links = node.base.links.get_outgoing(link_type=(LinkType.CALL_WORK, LinkType.CALL_CALC)).all()
    return {link.link_label: link.node for link in links}
