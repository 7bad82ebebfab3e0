"""Offline PBE pseudopotential family generated with ld1.x (see docs/pseudos.md).

``generate`` (no AiiDA import) writes the UPF files; ``family`` installs them as an aiida-pseudo
family labelled :data:`aiida_emlip.pseudos.family.FAMILY_LABEL`.
"""

from .generate import ELEMENTS, UnknownElementError, generate_family, recommended_cutoffs

__all__ = ("ELEMENTS", "UnknownElementError", "generate_family", "recommended_cutoffs")
