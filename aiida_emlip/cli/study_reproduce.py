"""``aiida-emlip reproduce``: import an exported study, relaunch its spec, say where the results differ."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from aiida_emlip.cli.study_common import (
    STUDY_ENTRY_POINT,
    print_outcome,
    run_in_shell,
    study_builder,
)
from aiida_emlip.profile import ProfileTarget

#: Comparison entries that measure time, not results: never reported as differences.
TIMINGS = ("wall_time_s", "train_structures_per_s", "cost_per_md_step_ms")
CODE_PORTS = ("pw_code", "train_code", "eval_code", "pp_code", "projwfc_code")


def archived_studies(file: Path) -> list[str]:
    """UUIDs of the studies in an archive (read without importing it)."""
    from aiida import orm
    from aiida.tools.archive.abstract import get_format

    try:
        with get_format().open(file, "r") as archive:
            query = archive.querybuilder().append(
                orm.WorkflowNode, filters={"process_type": STUDY_ENTRY_POINT}, project="uuid"
            )
            return list(query.all(flat=True))
    except Exception as exc:  # not an archive, or a corrupt one
        raise click.ClickException(f"{file} is not a readable AiiDA archive: {exc}") from None


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def differences(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> tuple[list[str], int]:
    """Lines naming each result that changed (timings left out) and the number of numbers compared."""
    before, after = dict(leaves(old)), dict(leaves(new))
    lines, compared = [], 0
    for path in sorted(set(before) | set(after)):
        if path.rsplit(".", 1)[-1] in TIMINGS or path.startswith(
            ("split.dataset", "split.held_out_structures")
        ):
            continue
        if path.startswith("split.training_structures"):
            continue
        a, b = before.get(path), after.get(path)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            compared += 1
            if math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=1e-12):
                continue
            lines.append(f"  {path}: {a:.6g} → {b:.6g}")
        elif a != b and path.split(".")[0] != "verdict":
            lines.append(f"  {path}: {a!r} → {b!r}")
    return lines, compared


def import_and_rehash(file: Path) -> int:
    """Import the archive; give its processes their hashes back (an archive drops them), so that the
    cache can find them. Returns the number of processes hashed."""
    import logging

    from aiida import orm
    from aiida.manage import get_manager
    from aiida.tools.archive import import_archive

    get_manager().get_profile_storage()  # loading the storage reconfigures the logging: do it first
    for name in ("aiida.export", "aiida.archive"):
        logging.getLogger(name).setLevel(logging.WARNING)  # its tables would bury our lines
    group_pk = import_archive(file)
    if group_pk is None:
        return 0
    count = 0
    for node in orm.load_group(pk=group_pk).nodes:
        if isinstance(node, orm.ProcessNode) and node.is_finished_ok:
            node.base.caching.rehash()
            count += 1
    return count


def _configure_local(computer) -> bool:
    """Configure an imported ``core.local`` computer for this user (nothing to ask); True if usable."""
    if computer.is_configured:
        return True
    if computer.transport_type != "core.local":
        return False
    computer.configure(safe_interval=0.0)
    return True


def reproduce_archive(
    file: Path, study_uuid: str | None, cache: bool, tolerance: float, target: ProfileTarget
) -> None:
    """Import, relaunch with the archived codes (or the profile's), compare, print."""
    from aiida import orm

    uuids = archived_studies(file)
    if not uuids:
        raise click.ClickException(f"{file} holds no study (an archive written by `aiida-emlip export`)")
    if study_uuid is None and len(uuids) > 1:
        raise click.ClickException(
            f"{file} holds {len(uuids)} studies: choose one with --study {{{', '.join(uuids)}}}"
        )
    uuid = study_uuid or uuids[0]
    if uuid not in uuids:
        raise click.ClickException(f"no study {uuid} in {file} (it holds {', '.join(uuids)})")
    click.echo(f"Importing {file} into profile {target.name!r} ...")
    rehashed = import_and_rehash(file)
    click.echo(f"Imported; {rehashed} calculations available to the cache")
    original = orm.load_node(uuid)
    if "comparison" not in original.outputs:
        click.echo("note: the archived study has no comparison; nothing to compare against")
    codes = {}
    for port in CODE_PORTS:
        if port not in original.inputs:
            continue
        code = original.inputs[port]
        if _configure_local(code.computer):
            codes[port[: -len("_code")]] = code
        else:
            click.echo(
                f"note: {port} {code.full_label} is on a computer not configured here; using the spec's code "
                "label of this profile (its runs cannot come from the archive's cache)"
            )
    spec = original.inputs.spec.get_dict()
    text = original.inputs.spec_text.value if "spec_text" in original.inputs else None
    mode = "on" if cache else "off"
    click.echo(f"Relaunching study {spec['name']!r} (archived <{original.pk}>) with caching {mode}")
    node = run_in_shell(study_builder(spec, text, codes), cache)
    print_outcome(node, target)
    if "comparison" not in node.outputs or "comparison" not in original.outputs:
        raise click.ClickException("no comparison to set against the archived one")
    lines, compared = differences(
        original.outputs.comparison.get_dict(), node.outputs.comparison.get_dict(), tolerance
    )
    if lines:
        click.echo(f"{len(lines)} results differ from the archived study <{original.pk}>:")
        for line in lines:
            click.echo(line)
    else:
        click.echo(
            f"The new results match the archived ones: {compared} numbers within a relative {tolerance:g} "
            "(timings left out)."
        )
    click.echo(f"New report: aiida-emlip report {node.pk} --output DIR")
