"""``verdi data emlip.dataset list/show/export``."""

from __future__ import annotations

import json

import click
from aiida.cmdline.groups import VerdiCommandGroup
from aiida.cmdline.params import arguments, types
from aiida.cmdline.utils import decorators, echo

from aiida_emlip.cli.export import OVERWRITE_OPTION, export_atomic


@click.group("emlip.dataset", cls=VerdiCommandGroup)
def dataset() -> None:
    """Inspect and export emlip.dataset nodes (configurations + DFT labels)."""


@dataset.command("list")
@decorators.with_dbenv()
def dataset_list() -> None:
    """List the stored datasets: pk, configurations, elements, charge states, labels."""
    from aiida import orm

    from aiida_emlip.data import EmlipDatasetData

    query = orm.QueryBuilder().append(EmlipDatasetData, project=["id", "ctime", "attributes"])
    rows = sorted(query.all(), key=lambda row: row[0])
    if not rows:
        echo.echo_report("no emlip.dataset nodes")
        return
    click.echo(f"{'PK':>6}  {'N':>5}  {'elements':<16} {'charges':<16} labels")
    for pk, _ctime, attrs in rows:
        charges = ",".join(f"{q:g}" for q in attrs.get("total_charges", []))
        elements = ",".join(attrs.get("elements", []))
        labels = ",".join(attrs.get("label_keys", []))
        click.echo(f"{pk:>6}  {attrs.get('n_configurations', 0):>5}  {elements:<16} {charges:<16} {labels}")


@dataset.command("show")
@arguments.DATUM(type=types.DataParamType(sub_classes=("aiida.data:emlip.dataset",)))
@decorators.with_dbenv()
def dataset_show(datum) -> None:
    """Show the summary attributes of DATUM."""
    attrs = dict(datum.base.attributes.all)
    click.echo(json.dumps(attrs, indent=2, sort_keys=True, default=str))


@dataset.command("export")
@arguments.DATUM(type=types.DataParamType(sub_classes=("aiida.data:emlip.dataset",)))
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@OVERWRITE_OPTION
@decorators.with_dbenv()
def dataset_export(datum, path: str, overwrite: bool) -> None:
    """Write DATUM's extxyz file to PATH (an existing PATH only with --overwrite)."""
    out = export_atomic(datum, path, overwrite)
    echo.echo_success(f"wrote {datum.n_configurations} configurations to {out}")
