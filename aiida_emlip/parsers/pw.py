"""``emlip.pw``: aiida-quantumespresso's pw.x parser, plus what the dataset labels need from stdout.

aiida-quantumespresso's ``PwParser`` misses two things pw.x 6.7 prints: the dipole computed with
``dipfield`` (``Computed dipole along edir(3) :`` then ``Dipole <x> Ry au, <y> Debye``) and, with fixed
occupations and empty bands, the ``highest occupied, lowest unoccupied level (ev):`` line. This
parser adds them to ``output_parameters`` (``dipole_debye``, ``highest_occupied_level``,
``lowest_unoccupied_level``), so that every label of a configuration is read once, by the parser, and
nothing downstream re-reads the stdout. Everything else, exit codes included, is ``PwParser``'s.
"""

from __future__ import annotations

import re

from aiida_quantumespresso.parsers.pw import PwParser

from aiida_emlip.cache_version import PW_PARSER_REVISION

_DIPOLE_RE = re.compile(r"Dipole\s+[-+.\dEe]+\s+Ry au,\s+([-+.\dEe]+)\s+Debye")
_LEVELS_RE = re.compile(r"highest occupied, lowest unoccupied level \(ev\):\s+([-+.\dEe]+)\s+([-+.\dEe]+)")
_HOMO_RE = re.compile(r"highest occupied level \(ev\):\s+([-+.\dEe]+)")


def parse_dipole_debye(stdout: str) -> float | None:
    """Return the last dipole (Debye, along ``edir``) that pw.x printed with ``dipfield``, or None."""
    value = None
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if "Computed dipole along edir" in line:
            for follow in lines[i + 1 : i + 4]:
                match = _DIPOLE_RE.search(follow)
                if match:
                    value = float(match.group(1))
                    break
    return value


def parse_band_edges(stdout: str) -> tuple[float | None, float | None]:
    """Return (highest occupied, lowest unoccupied level) in eV from pw.x's last report, None if absent.

    pw.x prints both with fixed occupations when ``nbnd`` exceeds the occupied bands, otherwise only the
    highest occupied level (measured from the cell-average electrostatic potential, like every level).
    """
    matches = _LEVELS_RE.findall(stdout)
    if matches:
        homo, lumo = matches[-1]
        return float(homo), float(lumo)
    homos = _HOMO_RE.findall(stdout)
    return (float(homos[-1]) if homos else None), None


def stdout_labels(stdout: str) -> dict[str, float]:
    """The values :class:`EmlipPwParser` adds to ``output_parameters`` (only those pw.x printed)."""
    extra: dict[str, float] = {}
    dipole = parse_dipole_debye(stdout)
    if dipole is not None:
        extra["dipole_debye"] = dipole
    homo, lumo = parse_band_edges(stdout)
    if homo is not None:
        extra["highest_occupied_level"] = homo
    if lumo is not None:
        extra["lowest_unoccupied_level"] = lumo
    return extra


class EmlipPwParser(PwParser):
    """``PwParser`` with the dipole and band edges of pw.x's stdout in ``output_parameters``."""

    #: Part of the hash of every pw.x run parsed by this parser (see cache_version).
    CACHE_VERSION = PW_PARSER_REVISION

    def parse(self, **kwargs):
        exit_code = super().parse(**kwargs)
        parameters = self.outputs.get("output_parameters")
        if parameters is None or parameters.is_stored:
            return exit_code
        filename = self.node.get_option("output_filename")
        try:
            stdout = self.retrieved.base.repository.get_object_content(filename)
        except OSError:  # no stdout retrieved: PwParser has reported it
            return exit_code
        extra = stdout_labels(stdout)
        # the XML's own highest occupied level wins where it has one
        values = {**extra, **parameters.get_dict()}
        parameters.set_dict(values)
        return exit_code
