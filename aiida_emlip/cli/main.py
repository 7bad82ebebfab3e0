"""Entry point of the ``aiida-emlip`` command line.

Subcommands import :mod:`aiida` lazily: the AiiDA configuration directory has to be chosen
(:func:`aiida_emlip.profile.select_profile`) before the first ``import aiida``.
"""

from __future__ import annotations

import warnings

import click

from aiida_emlip import __version__
from aiida_emlip.cli.demo import demo
from aiida_emlip.cli.doctor import doctor
from aiida_emlip.cli.setup import setup
from aiida_emlip.cli.study import export, launch, list_, report, reproduce, status

# The isolated configuration directory is created on purpose: aiida's notice about it is noise here.
warnings.filterwarnings("ignore", message="Creating AiiDA configuration folder", category=UserWarning)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aiida-emlip")
def cli() -> None:
    """aiida-emlip: DFT data, training and validation of electrostatic MLIPs in one AiiDA graph."""


cli.add_command(setup)
cli.add_command(doctor)
cli.add_command(demo)
for command in (launch, status, report, export, reproduce, list_):
    cli.add_command(command)
