"""The environment of a Quantum ESPRESSO program started without ``mpirun`` (an MPI singleton).

Debian's QE is linked with Open MPI. Started without ``mpirun``, an Open MPI 4 program is a singleton,
and two things can stop it inside ``MPI_Init``, before any work:

* it first launches a supporting daemon (``orted``); when that launch fails ("Unable to start a daemon
  on the local node": ``orted`` not on the ``PATH``, or a busy machine) the program dies. These
  programs never spawn processes, so they run without the daemon (``ess_singleton_isolated``);
* every singleton of a user shares one session directory, ``$TMPDIR/ompi.<host>.<uid>/jf.0``, and
  removes it when it ends. A singleton starting at that moment fails to create it ("A call to mkdir
  was unable to create the desired directory"; about one run in 160 with six at once). Each run
  therefore keeps its session directory in its own working directory (``orte_tmpdir_base``); Open
  MPI removes it when the program ends.

A value the user sets wins. Open MPI 5 and MPICH ignore these variables.

This module does not import AiiDA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ("MPI_SINGLETON_ENV", "SESSION_DIR_VARIABLE", "singleton_env", "singleton_exports")

#: Run without the ``orted`` daemon.
MPI_SINGLETON_ENV = {"OMPI_MCA_ess_singleton_isolated": "1"}
#: Where Open MPI 4 puts the session directory of a run (default ``$TMPDIR``, shared by all runs).
SESSION_DIR_VARIABLE = "OMPI_MCA_orte_tmpdir_base"


def singleton_env(run_dir: str | Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with the singleton settings added where it has none; the
    session directory in ``run_dir``, the program's own working directory."""
    base = dict(os.environ if environ is None else environ)
    return {**MPI_SINGLETON_ENV, SESSION_DIR_VARIABLE: str(run_dir), **base}


def singleton_exports() -> str:
    """The same settings as shell lines for a job script run in its working directory (``$PWD``)."""
    values = {**MPI_SINGLETON_ENV, SESSION_DIR_VARIABLE: "$PWD"}
    return "\n".join(f'export {key}="${{{key}:-{value}}}"' for key, value in values.items())
