"""``verdi data emlip.model``: list, show and export trained models."""

from __future__ import annotations

import json

import click
from aiida.cmdline.groups import VerdiCommandGroup
from aiida.cmdline.params import arguments, types
from aiida.cmdline.utils import decorators, echo

from aiida_emlip.cli.export import OVERWRITE_OPTION, export_atomic


@click.group("emlip.model", cls=VerdiCommandGroup)
def model_cli() -> None:
    """Trained aiida-emlip models (``EmlipModelData``)."""


@model_cli.command("list")
@decorators.with_dbenv()
def model_list() -> None:
    """One line per stored model: PK, head, elements, creation time."""
    from aiida.orm import QueryBuilder

    from aiida_emlip.data.model import EmlipModelData

    query = QueryBuilder().append(
        EmlipModelData, project=["id", "attributes.head", "attributes.elements", "ctime"]
    )
    rows = query.all()
    if not rows:
        echo.echo_report("no emlip.model nodes in this profile")
        return
    for pk, head, elements, ctime in sorted(rows):
        echo.echo(f"{pk:>6}  {head['name']:<11} {'-'.join(elements):<20} {ctime:%Y-%m-%d %H:%M}")


@model_cli.command("show")
@arguments.DATUM(type=types.DataParamType(sub_classes=("aiida.data:emlip.model",)))
def model_show(datum) -> None:
    """Print the config, versions and extra information of a model."""
    attributes = {
        key: datum.base.attributes.get(key) for key in ("head", "elements", "sha256", "versions", "extra")
    }
    echo.echo(json.dumps(attributes, indent=2, sort_keys=True))


@model_cli.command("export")
@arguments.DATUM(type=types.DataParamType(sub_classes=("aiida.data:emlip.model",)))
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@OVERWRITE_OPTION
def model_export(datum, path: str, overwrite: bool) -> None:
    """Write the model file (safetensors) to PATH (an existing PATH only with --overwrite)."""
    export_atomic(datum, path, overwrite)
    echo.echo_success(f"model {datum.pk} written to {path}")
