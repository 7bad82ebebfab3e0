"""Generate the project's offline PBE pseudopotential family with ``ld1.x``.

The ``ld1.x`` inputs live in ``aiida_emlip/pseudos/inputs/<El>.in``; each writes one
``<El>.pbe-emlip.UPF``. Recommended cutoffs, measured with ``pw.x``, live in ``cutoffs.yaml``.
This module deliberately does not import AiiDA: it is usable from plain scripts and tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import yaml

from aiida_emlip.pseudos.mpi_env import singleton_env

__all__ = (
    "ELEMENTS",
    "INPUTS_DIR",
    "Ld1Error",
    "Ld1NotFoundError",
    "UnknownElementError",
    "generate_family",
    "input_path",
    "recommended_cutoffs",
    "upf_filename",
)

PACKAGE_DIR = Path(__file__).resolve().parent
INPUTS_DIR = PACKAGE_DIR / "inputs"
CUTOFFS_FILE = PACKAGE_DIR / "cutoffs.yaml"

#: Elements covered by the family, in the order they are generated.
ELEMENTS: tuple[str, ...] = ("H", "Li", "C", "O", "F", "Na", "Mg", "Al", "Si", "Cl", "Cu")

#: Suffix of every UPF file of the family: ``<El>.pbe-emlip.UPF``.
UPF_SUFFIX = ".pbe-emlip.UPF"

_HASH_SUFFIX = ".sha256"
_FILE_PSEUDO_RE = re.compile(r"file_pseudopw\s*=\s*['\"]([^'\"]+)['\"]", re.IGNORECASE)
_ERROR_MARKERS = ("%%%%%%%%", "Error in routine")


class UnknownElementError(ValueError):
    """An element outside the family was requested; the message lists the available elements."""

    def __init__(self, elements: Iterable[str], available: Iterable[str], family: str = "emlip ld1 family"):
        self.elements = sorted(set(elements))
        self.available = sorted(available)
        super().__init__(
            f"element(s) {', '.join(self.elements)} not in pseudopotential family '{family}'; "
            f"available elements: {', '.join(self.available)}"
        )


class Ld1NotFoundError(FileNotFoundError):
    """The ``ld1.x`` executable is not on the ``PATH``."""


class Ld1Error(RuntimeError):
    """``ld1.x`` ran but did not produce a valid UPF file."""


def upf_filename(element: str) -> str:
    """Return the UPF file name of ``element`` (``<El>.pbe-emlip.UPF``)."""
    return f"{element}{UPF_SUFFIX}"


def input_path(element: str) -> Path:
    """Return the path of the ``ld1.x`` input of ``element``; raise for an unknown element."""
    _check_known([element])
    return INPUTS_DIR / f"{element}.in"


def _check_known(elements: Iterable[str]) -> None:
    unknown = [el for el in elements if el not in ELEMENTS]
    if unknown:
        raise UnknownElementError(unknown, ELEMENTS)


def _input_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _find_ld1(ld1: str) -> str:
    exe = shutil.which(ld1)
    if exe is None:
        raise Ld1NotFoundError(
            f"'{ld1}' not found on PATH: install Quantum ESPRESSO's atomic code, e.g. "
            "`apt-get install quantum-espresso` (Debian package `quantum-espresso`), "
            "or pass the executable's path as `ld1=`."
        )
    return exe


def _run_ld1(exe: str, element: str, text: str, target: Path) -> None:
    """Run ``ld1.x`` on ``text`` in a temporary directory and move the UPF to ``target``."""
    match = _FILE_PSEUDO_RE.search(text)
    if match is None:
        raise Ld1Error(f"{element}: ld1.x input sets no file_pseudopw")
    produced_name = match.group(1)
    with tempfile.TemporaryDirectory(prefix=f"ld1_{element}_") as tmp:
        proc = subprocess.run(
            [exe],
            input=text,
            capture_output=True,
            text=True,
            cwd=tmp,
            timeout=300,
            check=False,
            env=singleton_env(tmp),
        )
        output = proc.stdout + proc.stderr
        produced = Path(tmp) / produced_name
        failed = [marker for marker in _ERROR_MARKERS if marker in output]
        if proc.returncode != 0 or failed or not produced.is_file() or produced.stat().st_size == 0:
            tail = "\n".join(output.splitlines()[-25:])
            raise Ld1Error(
                f"ld1.x failed for {element} (exit code {proc.returncode}, "
                f"markers {failed}, UPF written: {produced.is_file()}):\n{tail}"
            )
        content = produced.read_text()
        if "<PP_HEADER" not in content or "<PP_LOCAL" not in content:
            raise Ld1Error(f"ld1.x wrote an incomplete UPF for {element}: {produced}")
        # copy next to the target, then rename: readers never see a half-written UPF
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        shutil.copyfile(produced, partial)
        os.replace(partial, target)


def generate_family(
    outdir: Path, elements: Iterable[str] | None = None, ld1: str = "ld1.x"
) -> dict[str, Path]:
    """Generate the UPF files of ``elements`` (default: all of :data:`ELEMENTS`) into ``outdir``.

    Idempotent: an element is skipped when its UPF exists and the sha256 of its ``ld1.x`` input,
    stored next to the UPF as ``<file>.sha256``, matches; otherwise it is regenerated.

    :returns: mapping element -> path of its UPF file.
    :raises UnknownElementError: an element is not in the family.
    :raises Ld1NotFoundError: ``ld1.x`` is needed but missing.
    :raises Ld1Error: ``ld1.x`` failed or wrote no UPF.
    """
    wanted = list(ELEMENTS if elements is None else elements)
    _check_known(wanted)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    exe: str | None = None
    result: dict[str, Path] = {}
    for element in wanted:
        text = input_path(element).read_text()
        digest = _input_hash(text)
        target = outdir / upf_filename(element)
        stamp = outdir / (target.name + _HASH_SUFFIX)
        if target.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
            result[element] = target
            continue
        if exe is None:
            exe = _find_ld1(ld1)
        stamp.unlink(missing_ok=True)
        _run_ld1(exe, element, text, target)
        stamp.write_text(digest + "\n")
        result[element] = target
    return result


@cache
def _cutoffs_table() -> dict[str, dict[str, float]]:
    with CUTOFFS_FILE.open() as handle:
        data = yaml.safe_load(handle)
    return data["elements"]


def recommended_cutoffs(element: str) -> tuple[float, float]:
    """Return ``(ecutwfc, ecutrho)`` in Ry for ``element``, as measured and stored in ``cutoffs.yaml``."""
    _check_known([element])
    entry = _cutoffs_table()[element]
    return float(entry["ecutwfc"]), float(entry["ecutrho"])
