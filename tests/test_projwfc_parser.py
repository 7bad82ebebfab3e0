"""The ``emlip.projwfc`` parser on recorded projwfc.x 6.7 stdout: ProjwfcParser's work plus Löwdin charges."""

from __future__ import annotations

import io

import numpy as np
import pytest

from aiida_emlip.parsers.projwfc import LowdinBlockError, parse_lowdin

#: projwfc.x 6.7 on H2O in a 6 Å box (ecutwfc 25 Ry), trimmed.
STDOUT_H2O = """
 k =   0.0000000000  0.0000000000  0.0000000000
==== e(   4) =    -6.62882 eV ====
     psi = 0.990*[#   3]
    |psi|^2 = 0.990

Lowdin Charges:

     Atom #   1: total charge =   6.6922, s =  1.6609,
     Atom #   1: total charge =   6.6922, p =  5.0314, pz=  1.6973, px=  1.9799, py=  1.3542,
     Atom #   2: total charge =   0.5943, s =  0.5943,
     Atom #   2: total charge =   0.5943, p =  0.0000, pz=  0.0000, px=  0.0000, py=  0.0000,
     Atom #   3: total charge =   0.5943, s =  0.5943,
     Atom #   3: total charge =   0.5943, p =  0.0000, pz=  0.0000, px=  0.0000, py=  0.0000,
     Spilling Parameter:   0.0149

     PROJWFC      :      0.13s CPU      0.14s WALL
"""

#: H2O spin-polarised (nspin 2, tot_magnetization 2), trimmed to two atoms (used as an OH below).
STDOUT_SPIN = """
Lowdin Charges:

     Atom #   1: total charge =   6.0744, s =  1.7826, p =  4.2919,
                 spin up      =   3.6213, s =  0.9484,
                 spin up      =   3.6213, p =  2.6729, pz=  0.9410, px=  0.9940, py=  0.7380,
                 spin down    =   2.4531, s =  0.8342,
                 spin down    =   2.4531, p =  1.6189, pz=  0.8853, px=  0.0000, py=  0.7337,
                 polarization =   1.1682, s =  0.1142, p =  1.0540,
     Atom #   2: total charge =   0.7711, s =  0.7711, p =  0.0000,
                 spin up      =   0.5251, s =  0.5251,
                 spin down    =   0.2460, s =  0.2460,
                 polarization =   0.2790, s =  0.2790, p =  0.0000,
     Spilling Parameter:   0.0479
"""

NO_BLOCK = "     PROJWFC      :      0.13s CPU\n   JOB DONE.\n"
#: atom 1 missing from the block
INCOMPLETE = "Lowdin Charges:\n     Atom #   2: total charge =   0.5943, s =  0.5943,\n"
#: process type of the calculation nodes below (resolves with or without the entry point installed)
PROCESS_TYPE = "aiida_emlip.calculations.projwfc.EmlipProjwfcCalculation"


def test_parse_lowdin_populations():
    populations, spilling = parse_lowdin(STDOUT_H2O)
    assert populations == pytest.approx([6.6922, 0.5943, 0.5943])
    assert spilling == pytest.approx(0.0149)
    # the populations miss about spilling x N_valence electrons
    assert 8.0 - populations.sum() == pytest.approx(0.0149 * 8.0, abs=2e-3)


def test_parse_lowdin_spin_polarised_reads_totals():
    populations, spilling = parse_lowdin(STDOUT_SPIN)
    assert populations == pytest.approx([6.0744, 0.7711])
    assert spilling == pytest.approx(0.0479)


def test_parse_lowdin_rejects_missing_block():
    with pytest.raises(LowdinBlockError, match="no 'Lowdin Charges:'") as missing:
        parse_lowdin(NO_BLOCK)
    assert missing.value.missing
    with pytest.raises(LowdinBlockError, match="incomplete") as incomplete:
        parse_lowdin(INCOMPLETE)
    assert not incomplete.value.missing


def test_calculation_declares_the_lowdin_output():
    """ProjwfcCalculation's outputs are closed: the subclass declares ``lowdin`` and its exit codes."""
    from aiida import orm
    from aiida_quantumespresso.calculations.projwfc import ProjwfcCalculation

    from aiida_emlip.calculations.projwfc import EmlipProjwfcCalculation

    parent = ProjwfcCalculation.spec().outputs
    assert not parent.dynamic and "lowdin" not in parent
    port = EmlipProjwfcCalculation.spec().outputs["lowdin"]
    assert port.valid_type is orm.ArrayData and not port.required
    codes = EmlipProjwfcCalculation.exit_codes
    assert codes.ERROR_LOWDIN_CHARGES_MISSING.status == 360
    assert codes.ERROR_LOWDIN_CHARGES_INCOMPLETE.status == 361
    inherited = {code.status for code in ProjwfcCalculation.exit_codes.values()}
    assert inherited < {code.status for code in codes.values()} and not {360, 361} & inherited
    options = EmlipProjwfcCalculation.spec().inputs["metadata"]["options"]
    assert options["parser_name"].default == "emlip.projwfc"


def _upf(element: str, z_valence: float):
    from aiida_pseudo.data.pseudo import UpfData

    text = f'<UPF version="2.0.1">\n<PP_HEADER element="{element}" z_valence="{z_valence}"/>\n</UPF>\n'
    return UpfData(io.BytesIO(text.encode()), filename=f"{element}.upf").store()


def _projwfc_node(computer, stdout: str, symbols: list[str] | None):
    """A projwfc.x node whose parent_folder comes from a pw.x node on ``symbols`` (None: no pw.x parent)."""
    from aiida import orm
    from aiida.common.links import LinkType

    remote = orm.RemoteData(computer=computer, remote_path="/tmp/pw")
    if symbols is not None:
        positions = [[0.0, 0.0, 0.97 * i] for i in range(len(symbols))]
        structure = orm.StructureData(cell=np.eye(3) * 6.0)
        for symbol, position in zip(symbols, positions):
            structure.append_atom(position=position, symbols=symbol)
        pw = orm.CalcJobNode(computer=computer, process_type="aiida.calculations:quantumespresso.pw")
        pw.base.links.add_incoming(structure.store(), LinkType.INPUT_CALC, "structure")
        for symbol, z in (("O", 6.0), ("H", 1.0)):
            pw.base.links.add_incoming(_upf(symbol, z), LinkType.INPUT_CALC, f"pseudos__{symbol}")
        pw.store()
        remote.base.links.add_incoming(pw, LinkType.CREATE, "remote_folder")
    remote.store()
    node = orm.CalcJobNode(computer=computer, process_type=PROCESS_TYPE)
    node.set_option("output_filename", "aiida.out")
    node.set_option("resources", {"num_machines": 1})
    node.base.links.add_incoming(remote, LinkType.INPUT_CALC, "parent_folder")
    node.store()
    retrieved = orm.FolderData()
    retrieved.base.repository.put_object_from_bytes(stdout.encode(), "aiida.out")
    retrieved.base.links.add_incoming(node, LinkType.CREATE, "retrieved")
    retrieved.store()
    return node


def _parse(node):
    from aiida_emlip.parsers.projwfc import EmlipProjwfcParser

    results, function = EmlipProjwfcParser.parse_from_node(node, store_provenance=False)
    return results, function.exit_status, function.exit_message


@pytest.fixture
def parent_succeeds(monkeypatch):
    """ProjwfcParser's own parsing reports success (it needs the XML and PDOS files of a real run)."""
    from aiida.engine import ExitCode
    from aiida_quantumespresso.parsers.projwfc import ProjwfcParser

    monkeypatch.setattr(ProjwfcParser, "parse", lambda self, **kwargs: ExitCode(0))


@pytest.mark.parametrize(
    ("stdout", "symbols", "expected"),
    [
        pytest.param(STDOUT_H2O, ["O", "H", "H"], [6 - 6.6922, 1 - 0.5943, 1 - 0.5943], id="h2o"),
        pytest.param(STDOUT_SPIN, ["O", "H"], [6 - 6.0744, 1 - 0.7711], id="oh-spin-polarised"),
    ],
)
def test_parser_attaches_lowdin_charges(aiida_localhost, parent_succeeds, stdout, symbols, expected):
    node = _projwfc_node(aiida_localhost, stdout, symbols)
    results, status, _ = _parse(node)
    assert status == 0
    lowdin = results["lowdin"]
    assert lowdin.get_array("charges") == pytest.approx(expected, abs=1e-12)
    assert lowdin.get_array("populations") == pytest.approx(parse_lowdin(stdout)[0], abs=1e-12)
    assert lowdin.base.attributes.get("spilling") == parse_lowdin(stdout)[1]


def test_parser_without_pw_parent_gives_populations_only(aiida_localhost, parent_succeeds):
    results, status, _ = _parse(_projwfc_node(aiida_localhost, STDOUT_H2O, None))
    assert status == 0
    assert results["lowdin"].get_arraynames() == ["populations"]
    assert results["lowdin"].get_array("populations") == pytest.approx([6.6922, 0.5943, 0.5943])


@pytest.mark.parametrize(
    ("stdout", "symbols", "status", "message"),
    [
        pytest.param(NO_BLOCK, ["O", "H", "H"], 360, "no `Lowdin Charges:` block", id="missing"),
        pytest.param(INCOMPLETE, ["O", "H", "H"], 361, "atoms [2]", id="incomplete"),
        pytest.param(STDOUT_H2O, ["O", "H"], 361, "3 atoms printed, the parent structure has 2", id="atoms"),
    ],
)
def test_parser_exit_codes_of_the_lowdin_block(
    aiida_localhost, parent_succeeds, stdout, symbols, status, message
):
    results, exit_status, exit_message = _parse(_projwfc_node(aiida_localhost, stdout, symbols))
    assert exit_status == status and message in exit_message
    assert "lowdin" not in results


def test_lowdin_is_kept_when_projwfc_parser_fails(aiida_localhost):
    """The real ProjwfcParser fails here (no XML to read): its exit code wins, ``lowdin`` is still there."""
    results, status, _ = _parse(_projwfc_node(aiida_localhost, STDOUT_H2O, ["O", "H", "H"]))
    assert status == 301  # ERROR_NO_RETRIEVED_TEMPORARY_FOLDER
    assert "output_parameters" in results
    assert results["lowdin"].get_array("charges") == pytest.approx([6 - 6.6922, 1 - 0.5943, 1 - 0.5943])


def test_entry_point_is_a_projwfc_parser():
    from aiida.plugins import CalculationFactory, ParserFactory
    from aiida_quantumespresso.parsers.projwfc import ProjwfcParser

    from aiida_emlip.cache_version import PROJWFC_PARSER_REVISION

    parser = ParserFactory("emlip.projwfc")
    assert issubclass(parser, ProjwfcParser) and parser.__name__ == "EmlipProjwfcParser"
    assert parser.CACHE_VERSION == PROJWFC_PARSER_REVISION
    assert CalculationFactory("emlip.projwfc").__name__ == "EmlipProjwfcCalculation"
