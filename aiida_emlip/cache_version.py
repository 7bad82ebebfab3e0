"""Which finished calculations AiiDA's cache may hand out again, across versions of this package.

AiiDA reuses a finished calculation when the hash of a new one's inputs matches. The hash covers the
code node (computer and executable path), not the software behind the path: upgrading aiida-emlip in
place leaves ``emlip-train``'s code node unchanged, so without more, a relaunch after an upgrade would
reuse models trained by the old trainer. AiiDA adds a plugin's ``CACHE_VERSION`` (an integer on the
``CalcJob`` and on its parser) to the hash; this module sets it:

* ``emlip.train`` and ``emlip.evaluate``: derived from the package version and :data:`NUMERICS`, so a
  new release never reuses an older release's trainings or predictions (they are cheap next to DFT,
  and their numbers may have changed).
* the ``emlip.pw`` parser: :data:`PW_PARSER_REVISION` only, so pw.x results (the expensive part)
  survive releases; it is raised when the labels the parser adds change.
* the ``emlip.projwfc`` parser: :data:`PROJWFC_PARSER_REVISION` only, likewise for projwfc.x runs; it
  is raised when its ``lowdin`` output changes.

Raise :data:`NUMERICS` when a change to the trainer or the models changes results for the same inputs
between releases (a development install keeps its version number).
"""

from __future__ import annotations

import zlib

from aiida_emlip import __version__

#: The calculations (and the dataset workchain) a study reuses when caching is on (``launch``'s default;
#: the profile made by ``aiida-emlip setup --services`` enables them for its daemon).
CACHED_PROCESSES = (
    "aiida.calculations:quantumespresso.pw",
    "aiida.calculations:quantumespresso.pp",
    "aiida.calculations:emlip.projwfc",
    "aiida.calculations:emlip.train",
    "aiida.calculations:emlip.evaluate",
    # not a calculation: a dataset workchain with the inputs of a finished one returns that one's
    # outputs (aiida_emlip.workflows.reuse)
    "aiida.workflows:emlip.dataset",
)
#: Raised when emlip-train's or emlip-eval's results change for the same inputs within one version.
NUMERICS = 3
#: Raised when the ``emlip.pw`` parser's outputs change (new or different labels).
PW_PARSER_REVISION = 1
#: Raised when the ``emlip.projwfc`` parser's outputs change (its ``lowdin`` output).
PROJWFC_PARSER_REVISION = 1


def cache_version(component: str, version: str = __version__, numerics: int = NUMERICS) -> int:
    """A stable positive integer for ``component`` (``train``, ``evaluate``) of this package version."""
    return zlib.crc32(f"aiida-emlip:{component}:{version}:{numerics}".encode()) & 0x7FFFFFFF
