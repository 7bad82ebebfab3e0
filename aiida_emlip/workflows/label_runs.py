"""The process that labels one configuration of ``emlip.dataset``, and how its outputs are read.

A configuration with post-processing is labelled by an ``EmlipLabelWorkChain`` (``emlip.label``), which
calls its ``PwBaseWorkChain`` ``pw``; a configuration without is labelled by its ``PwBaseWorkChain``
alone, called by the dataset workchain itself: one process less per configuration (its creation, steps,
checkpoints and returned outputs, and one more parent waiting for its child to end: about a second of
wall time per configuration). The dataset workchain calls either ``label_<key>``; :func:`pw_of` and
:func:`label_outputs` read both alike.
"""

from __future__ import annotations

from aiida import orm
from aiida.common.links import LinkType

from .reuse import returned

#: Call link label of a configuration's labelling process: ``label_<key>``.
LABEL_PREFIX = "label_"
#: Process type of aiida-quantumespresso's ``PwBaseWorkChain`` (entry point ``quantumespresso.pw.base``).
PW_BASE_PROCESS_TYPE = "aiida.workflows:quantumespresso.pw.base"
#: Namespace of the pw.x outputs (and inputs) of an ``EmlipLabelWorkChain``; its ``PwBaseWorkChain``'s
#: call link label.
PW_NAMESPACE = "pw"


def called(node: orm.ProcessNode, link_label: str) -> orm.ProcessNode | None:
    """The process that ``node`` called with ``link_label`` (``None`` if it called none)."""
    links = node.base.links.get_outgoing(
        link_type=(LinkType.CALL_WORK, LinkType.CALL_CALC), link_label_filter=link_label
    ).all()
    return links[0].node if links else None


def is_pw_base(run: orm.ProcessNode) -> bool:
    """Whether the labelling process ``run`` is a ``PwBaseWorkChain`` (no post-processing)."""
    return run.process_type == PW_BASE_PROCESS_TYPE


def pw_of(run: orm.ProcessNode) -> orm.ProcessNode | None:
    """The ``PwBaseWorkChain`` of the labelling process ``run``: ``run`` itself, or the one that the label
    workchain ``run`` called (``None`` before it called one)."""
    return run if is_pw_base(run) else called(run, PW_NAMESPACE)


def label_outputs(run: orm.ProcessNode) -> dict[str, orm.Data]:
    """``{output port (dotted): node}`` of the labelling process ``run``, named as a label workchain's
    (``pw.output_parameters``, ``hirshfeld``, ...), one query.

    A ``PwBaseWorkChain``'s outputs count only once it finished OK, as a label workchain attaches them
    only then.
    """
    if not is_pw_base(run):
        return returned(run)
    if not run.is_finished_ok:
        return {}
    return {f"{PW_NAMESPACE}.{port}": node for port, node in returned(run).items()}
