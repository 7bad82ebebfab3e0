"""The ``emlip.train`` parser on output folders as emlip-train leaves them, one per exit code.

Each folder holds what a job retrieves (``exit_status``, ``stderr``, the results, a checkpoint): the
exit code, the message (emlip-train's own reason where it gave one) and the outputs attached are
checked without running a job. The model file and the checkpoint come as a job leaves them: in the
temporary retrieved folder (``retrieve_temporary_list``), not in ``retrieved``. (A job killed before
emlip-train wrote its status keeps the scheduler's verdict:
``test_train_base.py::test_parser_keeps_the_scheduler_verdict_without_an_exit_status``.)
"""

from __future__ import annotations

import json

import pytest
from models_helpers import HEAD_CONFIGS, tiny_model

from aiida_emlip.models.io import save_model

METRICS = json.dumps({"epochs": 2, "test": {"energy": {"all": {"rmse": float("nan"), "unit": "eV/atom"}}}})
CHECKPOINT = b"checkpoint bytes"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return save_model(tiny_model(HEAD_CONFIGS["sr"]), path).read_bytes()


def _parse(files: dict[str, bytes | str], temporary=None):
    """Run the parser on a calculation node whose retrieved folder holds ``files``, and with the folder
    ``temporary`` (if given) as the temporary retrieved folder."""
    from aiida import orm
    from aiida.common.links import LinkType

    from aiida_emlip.parsers.train import EmlipTrainParser

    node = orm.CalcJobNode(
        computer=orm.load_computer("localhost"), process_type="aiida.calculations:emlip.train"
    )
    node.set_option("resources", {"num_machines": 1})
    node.store()
    retrieved = orm.FolderData()
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        retrieved.base.repository.put_object_from_bytes(data, name)
    retrieved.base.links.add_incoming(node, LinkType.CREATE, "retrieved")
    retrieved.store()
    results, calcfunction = EmlipTrainParser.parse_from_node(
        node, store_provenance=False, retrieved_temporary_folder=None if temporary is None else str(temporary)
    )
    return results, calcfunction.exit_status, calcfunction.exit_message


def _job_folders(files: dict[str, bytes | str], temporary):
    """``files`` split as a job retrieves them: the model and checkpoint into the folder ``temporary``
    (``retrieve_temporary_list``), the rest as the ``retrieved`` folder's files (returned)."""
    from aiida_emlip.calculations.train import NODE_FILES

    temporary.mkdir(exist_ok=True)
    kept = {}
    for name, content in files.items():
        if name in NODE_FILES:
            (temporary / name).write_bytes(content.encode() if isinstance(content, str) else content)
        else:
            kept[name] = content
    return kept


def _stderr(line: str) -> str:
    return f"warning: data.reference_energies 'fit': ...\n[12:00:00] training on cpu\nerror: {line}\n"


CASES = {
    # exit status file, stderr line, extra files -> exit code, text of the message, outputs attached
    "ok": ("0", None, {"model", "metrics"}, 0, None, {"model", "metrics"}),
    "ok-with-checkpoint": (
        "0",
        None,
        {"model", "metrics", "checkpoint"},
        0,
        None,
        {"model", "metrics", "checkpoint"},
    ),
    "no-exit-status": (None, None, {"checkpoint"}, 300, "did not finish", {"checkpoint"}),
    "missing-model": ("0", None, {"metrics"}, 301, "model.safetensors are missing", set()),
    "invalid-metrics": ("0", None, {"model", "bad-metrics"}, 302, "metrics.json: Expecting", set()),
    "corrupted-model": ("0", None, {"flipped-model", "metrics"}, 302, "corrupted: the checksum", set()),
    "bad-input": (
        "2",
        "config.yaml: unknown key(s) ['colour'] in model.head",
        set(),
        310,
        "refused the config, data, checkpoint or job folder: config.yaml: unknown key(s) ['colour']",
        set(),
    ),
    "bad-input-no-stderr": ("2", None, set(), 310, "see the stderr of the calculation", set()),
    "non-finite": (
        "3",
        "non-finite loss at epoch 0, step 1 {'energy': nan}: stopping.",
        {"checkpoint"},
        320,
        "NaN/inf loss or gradient: non-finite loss at epoch 0",
        {"checkpoint"},
    ),
    "interrupted": ("4", None, {"checkpoint"}, 330, "the checkpoint is attached", {"checkpoint"}),
    "scf-failed": (
        "5",
        "the SCF of the scf head did not converge for structure 3 (on_failure: raise)",
        set(),
        340,
        "did not converge: the SCF of the scf head did not converge for structure 3",
        set(),
    ),
    "internal-error": ("1", None, set(), 350, "exit status 1", set()),
    "killed": ("137", None, {"checkpoint"}, 350, "exit status 137", {"checkpoint"}),
    "unreadable-status": ("x", None, set(), 350, "exit status -1", set()),
    "out-of-memory": (
        "7",
        "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower data.batch_size",
        set(),
        360,
        "out of memory (host or GPU): out of memory (CUDA out of memory",
        set(),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_exit_code_from_an_output_folder(train_code, model_bytes, case, tmp_path):  # localhost
    status, error, present, exit_code, message, attached = CASES[case]
    flipped = bytearray(model_bytes)
    flipped[-100] ^= 1
    contents = {
        "model": ("model.safetensors", model_bytes),
        "flipped-model": ("model.safetensors", bytes(flipped)),
        "metrics": ("metrics.json", METRICS),
        "bad-metrics": ("metrics.json", "{not json"),
        "checkpoint": ("checkpoint.pt", CHECKPOINT),
    }
    files = dict(contents[name] for name in present)
    files["stdout"] = ""
    if status is not None:
        files["exit_status"] = f"{status}\n"
    if error is not None:
        files["stderr"] = _stderr(error)
    temporary = tmp_path / "temporary"
    results, exit_status, exit_message = _parse(_job_folders(files, temporary), temporary)
    assert exit_status == exit_code, exit_message
    if message is not None:
        assert message in exit_message
    assert set(results) == attached
    if "model" in results:
        from aiida_emlip.data.model import EmlipModelData

        assert isinstance(results["model"], EmlipModelData) and results["model"].head_name == "sr"
        assert results["metrics"]["test"]["energy"]["all"]["rmse"] is None  # NaN stored as None
    if "checkpoint" in results:
        assert results["checkpoint"].get_content(mode="rb") == CHECKPOINT


def test_model_and_checkpoint_of_an_older_node_are_read_from_retrieved(train_code, model_bytes):
    """A node of an older version kept the model file and the checkpoint in ``retrieved`` (and parsing it
    again has no temporary folder): they are read from there."""
    files = {
        "model.safetensors": model_bytes,
        "checkpoint.pt": CHECKPOINT,
        "metrics.json": METRICS,
        "exit_status": "0\n",
        "stdout": "",
    }
    results, exit_status, exit_message = _parse(files)
    assert exit_status == 0, exit_message
    assert set(results) == {"model", "metrics", "checkpoint"}
    assert results["model"].head_name == "sr" and results["checkpoint"].get_content(mode="rb") == CHECKPOINT


def test_temporary_folder_comes_first(train_code, model_bytes, tmp_path):
    """With both (a file left in ``retrieved`` as well), the file of the temporary folder is stored."""
    (tmp_path / "checkpoint.pt").write_bytes(b"the job's checkpoint")
    files = {"checkpoint.pt": b"stale", "exit_status": "4\n", "stdout": ""}
    results, exit_status, _ = _parse(files, tmp_path)
    assert exit_status == 330
    assert results["checkpoint"].get_content(mode="rb") == b"the job's checkpoint"
