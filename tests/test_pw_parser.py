"""The ``emlip.pw`` parser on recorded pw.x 6.7 output: PwParser's results plus the dipole and band edges."""

from __future__ import annotations

import pytest

from aiida_emlip.parsers.pw import parse_dipole_debye, stdout_labels

DIPOLE_BLOCK = """
     Computed dipole along edir(3) :
        Elec. dipole         0.1234 Ry au,         0.3137 Debye
        Dipole               0.5432 Ry au,         1.3806 Debye
        Dipole field         0.0312 Ry au,
"""


def test_stdout_labels_on_recorded_lines():
    levels = "     highest occupied, lowest unoccupied level (ev):    -1.1886    2.1256\n"
    stdout = "header\n" + DIPOLE_BLOCK + levels + DIPOLE_BLOCK.replace("1.3806", "1.4000")
    # the last dipole of the run (the converged one), both band edges of the last report
    assert stdout_labels(stdout) == {
        "dipole_debye": pytest.approx(1.4),
        "highest_occupied_level": pytest.approx(-1.1886),
        "lowest_unoccupied_level": pytest.approx(2.1256),
    }
    assert parse_dipole_debye("     Dipole   0.5 Ry au,  1.2 Debye\n") is None  # not after the header
    assert stdout_labels("     highest occupied level (ev):     3.5000\n") == {"highest_occupied_level": 3.5}
    assert stdout_labels("no levels, no dipole") == {}


def test_entry_point_is_a_pwparser():
    from aiida.plugins import ParserFactory
    from aiida_quantumespresso.parsers.pw import PwParser

    parser = ParserFactory("emlip.pw")
    assert issubclass(parser, PwParser) and parser.__name__ == "EmlipPwParser"
