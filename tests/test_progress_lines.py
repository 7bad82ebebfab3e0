"""The progress lines that ``launch`` prints for the dataset workchain: every change, no repeats."""

from __future__ import annotations

import logging


def _record(pk: int, message: str) -> logging.LogRecord:
    record = logging.LogRecord(
        "aiida", 25, __file__, 1, f"[{pk}|EmlipDatasetWorkChain|_progress]: {message}", (), None
    )
    record.dbnode_id = pk
    return record


def test_dataset_progress_lines_print_each_change_once(capsys):
    from aiida_emlip.cli.study_common import ProgressHandler

    handler = ProgressHandler()
    handler.labels[7] = "EmlipDatasetWorkChain"  # what _label would load from the profile
    lines = [
        "progress: 0 done, 2 running, 0 failed, 3 waiting of 5",
        "progress: 1 done, 2 running, 0 failed, 2 waiting of 5",
        "progress: 1 done, 2 running, 1 failed, 1 waiting of 5",  # only the failed count moved
        "progress: 1 done, 2 running, 1 failed, 1 waiting of 5",  # the same counts again
        "configuration c0002 failed: exit status 402 (...)",  # not a progress line
        "finished: 4 labelled, 1 failed (c0002)",
    ]
    for message in lines:
        handler.emit(_record(7, message))
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in out] == [lines[0], lines[1], lines[2], lines[5]]
    assert all(line.startswith("[") and " s] Dataset<7>: " in line for line in out)
