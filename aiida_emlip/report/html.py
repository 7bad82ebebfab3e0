"""The study report as one static HTML page (inline CSS, PNG files beside it, no network, no server).

:func:`render_report` returns ``{path: bytes}``: ``index.html`` and ``figures/<name>.png``. A small inline
script checks, once the page has loaded, that every figure decoded (``naturalWidth > 0``) and writes the
result into ``#figure-check`` (``data-status`` ``ok`` or ``failed``), so that a headless browser can
verify the page.

The page's ``<head>`` carries :data:`GENERATOR` in a ``<meta name="generator">`` tag:
:func:`written_by_emlip` tells a directory holding an earlier report (which ``aiida-emlip demo`` may
write over) from one holding other files.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

from aiida_emlip import __version__
from aiida_emlip.analysis.study import distance_to_dft

#: The name in the report's ``<meta name="generator">`` tag (followed by the package version).
GENERATOR = "aiida-emlip"
_GENERATOR_TAG = re.compile(rf'<meta\s+name="generator"\s+content="{re.escape(GENERATOR)}[\s"]')
#: Reports written before the generator tag: the figure check paragraph and the study's PK line.
_EARLIER_MARKS = ('<p id="figure-check"', "(AiiDA PK ")


def written_by_emlip(page: str) -> bool:
    """Whether ``page`` (the text of an ``index.html``) is a study report written by aiida-emlip."""
    if _GENERATOR_TAG.search(page):
        return True
    return all(mark in page for mark in _EARLIER_MARKS)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:right}th{background:#f3f4f6}
td:first-child,th:first-child{text-align:left}
.best{background:#e6f4ea;font-weight:600}.verdict li{margin:.3rem 0}.muted{color:#666;font-size:.85rem}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#444}
pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;font-size:.8rem}code{font-size:.85rem}
nav a{margin-right:.8rem}
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
  var box = document.getElementById('figure-check');
  box.setAttribute('data-status', broken.length ? 'failed' : 'ok');
  box.setAttribute('data-images', String(images.length));
  box.textContent = broken.length
    ? broken.length + ' of ' + images.length + ' figures failed to load: ' +
      broken.map(function (img) { return img.getAttribute('src'); }).join(', ')
    : 'All ' + images.length + ' figures loaded.';
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.2g}"
    return _e(value)


def _table(header: list[str], rows: list[list[str]], best: set[tuple[int, int]] | None = None) -> str:
    """``rows`` are already escaped HTML cells; ``best``: (row, column) cells to highlight."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            highlight = best is not None and (i, j) in best
            cells.append(f'<td class="best">{cell}</td>' if highlight else f"<td>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _best(rows: list[list[Any]], columns: list[int]) -> set[tuple[int, int]]:
    """The (row, column) of the lowest number in each of ``columns``."""
    out = set()
    for column in columns:
        values = [(r[column], i) for i, r in enumerate(rows) if isinstance(r[column], (int, float))]
        if values:
            out.add((min(values)[1], column))
    return out


def _figure(name: str, caption: str, figures: Mapping[str, bytes]) -> str:
    if name not in figures:
        return ""
    return (
        f'<figure><img src="figures/{_e(name)}.png" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _rmse(row: Mapping[str, Any], quantity: str, group: str) -> float | None:
    return ((row.get("held_out") or {}).get(quantity) or {}).get(group, {}).get("rmse")


def _summary(designs: Mapping[str, Any]) -> str:
    header = [
        "design",
        "head",
        "energy, all (meV/atom)",
        "energy, charged",
        "energy, neutral",
        "forces (meV/Å)",
        "charges (me)",
        "training (s)",
        "MD step (ms)",
    ]
    raw = []
    for label, row in designs.items():
        training = row.get("training") or {}
        raw.append(
            [
                label,
                row.get("head"),
                _rmse(row, "energy", "all"),
                _rmse(row, "energy", "charged"),
                _rmse(row, "energy", "neutral"),
                _rmse(row, "forces", "all"),
                _rmse(row, "charges", "all"),
                training.get("wall_time_s"),
                row.get("cost_per_md_step_ms"),
            ]
        )
    best = _best(raw, [2, 3, 4, 5, 6])
    rows = [[_e(r[0]), _e(r[1] or "–"), *(_num(v) for v in r[2:])] for r in raw]
    return _table(header, rows, best)


def _groups_table(designs: Mapping[str, Any], quantity: str, prefix: str) -> str:
    groups = sorted(
        {g for row in designs.values() for g in ((row.get("held_out") or {}).get(quantity) or {})}
    )
    groups = [g for g in groups if g.startswith(prefix)]
    if not groups:
        return ""
    raw = [[label, *(_rmse(row, quantity, g) for g in groups)] for label, row in designs.items()]
    best = _best(raw, list(range(1, len(groups) + 1)))
    counts = []
    for g in groups:
        n = next(
            (
                ((row.get("held_out") or {}).get(quantity) or {}).get(g, {}).get("n")
                for row in designs.values()
                if ((row.get("held_out") or {}).get(quantity) or {}).get(g)
            ),
            None,
        )
        counts.append(f"{g.split('=', 1)[1]} (n={n})")
    rows = [[_e(r[0]), *(_num(v) for v in r[1:])] for r in raw]
    return _table(["design", *counts], rows, best)


def _cost(designs: Mapping[str, Any]) -> str:
    header = ["design", "wall time (s)", "epochs", "parameters", "device", "structures/s", "MD step (ms)"]
    rows = []
    for label, row in designs.items():
        t = row.get("training") or {}
        rows.append(
            [
                _e(label),
                _num(t.get("wall_time_s")),
                _e(t.get("epochs", "–")),
                _e(t.get("num_parameters", "–")),
                _e(t.get("device", "–")),
                _num(t.get("train_structures_per_s")),
                _num(row.get("cost_per_md_step_ms"), 2),
            ]
        )
    return _table(header, rows)


def _distance(value: Any, reference: float | None) -> Any:
    """A validation metric's distance to DFT, for the highlight (numbers only)."""
    return distance_to_dft(value, reference) if isinstance(value, (int, float)) else value


def _validations(comparison: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    designs = comparison.get("designs", {})
    parts = []
    for name, table in (comparison.get("validations") or {}).items():
        metrics = sorted(
            {m for row in designs.values() for m in (row.get("validations") or {}).get(name, {})}
        )
        parts.append(f"<h3>{_e(name)}</h3>")
        if metrics:
            references = (comparison.get("validation_references") or {}).get(name) or {}
            raw = [
                [label, *((row.get("validations") or {}).get(name, {}).get(m) for m in metrics)]
                for label, row in designs.items()
            ]
            distance = [
                [r[0], *(_distance(v, references.get(m)) for v, m in zip(r[1:], metrics, strict=True))]
                for r in raw
            ]
            best = _best(distance, list(range(1, len(metrics) + 1)))
            rows = [[_e(r[0]), *(_num(v, 3) for v in r[1:])] for r in raw]
            if any(v is not None for v in references.values()):
                # DFT first, never highlighted: the designs' best is the one closest to it
                rows.insert(0, ["DFT", *(_num(references.get(m), 3) for m in metrics)])
                best = {(i + 1, j) for i, j in best}
            parts.append(_table(["design", *metrics], rows, best))
        if "dft" in table:
            parts.append(
                "<details><summary>DFT reference row</summary>"
                f"<pre>{_e(json.dumps(table['dft'], indent=1))}</pre></details>"
            )
        prefix = f"validation_{name}_"
        for figure in sorted(k for k in figures if k.startswith(prefix)):
            parts.append(_figure(figure, f"{name}: {figure[len(prefix) :].replace('_', ' ')}", figures))
    if not parts:
        return "<p>No validation in this study.</p>"
    note = (
        "<p class='muted'>Each validation runs its own DFT on its own cells (e.g. the vacancy at the "
        "pristine geometry); none of them is in any design's training set.</p>"
    )
    return note + "\n".join(parts)


def _active_learning(comparison: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The rounds: training size, pw.x runs, new labels, every design's held-out energy error, the scores
    of the chosen frames; best design of each round highlighted."""
    view = comparison.get("active_learning")
    if not view:
        return ""
    rounds = view.get("rounds") or []
    labels = sorted({label for r in rounds for label in (r.get("energy_error") or {})})
    raw = [[(r.get("energy_error") or {}).get(label) for label in labels] for r in rounds]
    best = set()  # the lowest error of each round; the designs' columns start at 4
    for i, values in enumerate(raw):
        known = [(v, j) for j, v in enumerate(values) if isinstance(v, (int, float))]
        if known:
            best.add((i, 4 + min(known)[1]))
    rows = [
        [
            _e(r.get("round")),
            _e(r.get("training_size", "–")),
            _e(r.get("dft_calls", 0)),
            _e(r.get("labelled", 0)),
            *(_num(v) for v in values),
            _e(", ".join(_num(s, 3) for s in r.get("selected_scores") or []) or "–"),
        ]
        for r, values in zip(rounds, raw, strict=True)
    ]
    header = ["round", "training structures", "pw.x runs", "new labels"]
    header += [f"{label} (meV/atom)" for label in labels] + ["scores of the chosen frames"]
    table = _table(header, rows, best)
    how = (
        f"committee disagreement ({_e(view.get('uncertainty'))}) of {_e(view.get('model'))} models"
        if view.get("selection") == "committee"
        else f"SCF failures of {_e(view.get('model'))}"
    )
    intro = (
        f"<p>{_e(view.get('rounds_run', 0))} round(s) selected by {how}; "
        f"{_e(view.get('dft_calls', 0))} pw.x runs in all; stopped: {_e(view.get('stop_reason'))}. Held-out "
        "energy RMSE of every design after each round (round 0: the first training); the held-out set is "
        "the same in every round and never labelled for training.</p>"
    )
    return (
        '<h2 id="active">Active learning</h2>'
        + intro
        + table
        + _figure("active_learning", "held-out energy error per round", figures)
    )


def _split(comparison: Mapping[str, Any]) -> str:
    split = comparison.get("split") or {}
    held = split.get("held_out_structures") or {}
    lines = [
        f"<p>{len(held)} structures ({len(split.get('held_out_geometries') or [])} geometries) were held "
        "out and never used to train or validate any design; "
        f"{len(split.get('training_keys') or [])} structures were "
        "used for training (a validation fraction of them for early diagnostics). Rule: "
        f"{_e(split.get('rule', ''))}.</p>"
    ]
    rows = [[_e(key), f"<code>{_e(uuid)}</code>"] for key, uuid in sorted(held.items())]
    lines.append("<details><summary>held-out structures (StructureData UUIDs)</summary>")
    lines.append(_table(["key", "UUID"], rows) + "</details>")
    return "\n".join(lines)


def _provenance(provenance: Mapping[str, Any]) -> str:
    versions = _table(
        ["package", "version"], [[_e(k), _e(v)] for k, v in (provenance.get("versions") or {}).items()]
    )
    codes = _table(
        ["code", "label", "UUID"],
        [
            [_e(k), _e(v.get("label")), f"<code>{_e(v.get('uuid'))}</code>"]
            for k, v in (provenance.get("codes") or {}).items()
        ],
    )
    nodes = _table(
        ["node", "UUID"],
        [[_e(k), f"<code>{_e(v)}</code>"] for k, v in (provenance.get("nodes") or {}).items()],
    )
    commands = "\n".join(provenance.get("reproduce") or [])
    spec = provenance.get("spec_text")
    spec_block = f"<details><summary>the study spec</summary><pre>{_e(spec)}</pre></details>" if spec else ""
    return (
        f"<p>Pseudopotential family <code>{_e(provenance.get('pseudo_family'))}</code>; DFT protocol "
        f"<code>{_e(json.dumps(provenance.get('dft', {})))}</code>.</p>"
        f"<h3>Reproduce</h3><pre>{_e(commands)}</pre>"
        "<p class='muted'>export writes the whole provenance graph as an AiiDA archive; reproduce imports "
        "it and relaunches the spec with caching on, so unchanged steps are reused, and prints where "
        "results differ.</p>"
        f"<h3>Versions</h3>{versions}<h3>Codes</h3>{codes}<h3>Nodes</h3>{nodes}{spec_block}"
    )


def render_report(
    comparison: Mapping[str, Any], figures: Mapping[str, bytes], provenance: Mapping[str, Any]
) -> dict[str, bytes]:
    """``index.html`` and ``figures/<name>.png`` of the study report."""
    study = provenance.get("study") or {}
    title = study.get("title") or study.get("name") or "study"
    designs = comparison.get("designs", {})
    verdict = "".join(f"<li>{_e(line)}</li>" for line in comparison.get("verdict") or [])
    parity = "".join(
        _figure(f"parity_{label}", f"{label}: DFT vs model energy per atom on the held-out set", figures)
        for label in designs
    )
    active_link = '<a href="#active">active learning</a>' if comparison.get("active_learning") else ""
    body = f"""
<h1>{_e(title)}</h1>
<p class="muted">Study <code>{_e(study.get("name"))}</code> (AiiDA PK {_e(provenance.get("pk"))}, UUID
<code>{_e((provenance.get("nodes") or {}).get("study"))}</code>). {_e(provenance.get("description", ""))}</p>
<nav><a href="#verdict">verdict</a><a href="#errors">errors</a><a href="#training">training</a>
<a href="#validation">validation</a>{active_link}<a href="#cost">cost</a><a href="#split">held-out set</a>
<a href="#provenance">provenance</a></nav>
<h2 id="verdict">Verdict</h2>
<ul class="verdict">{verdict or "<li>No comparison available.</li>"}</ul>
{_summary(designs)}
<p class="muted">Root-mean-square errors on the held-out structures; best value of each column highlighted.
Energies per atom, forces per component, charges against the DFT (Hirshfeld) charges where both exist.</p>
<h2 id="errors">Errors per charge state and configuration type</h2>
<h3>Energy RMSE per total charge (meV/atom)</h3>{_groups_table(designs, "energy", "total_charge=")}
<h3>Energy RMSE per configuration type (meV/atom)</h3>{_groups_table(designs, "energy", "config_type=")}
<h3>Force RMSE per total charge (meV/Å)</h3>{_groups_table(designs, "forces", "total_charge=")}
{_figure("errors_by_charge", "held-out energy error per total charge state", figures)}
<h3>Parity plots</h3>{parity or "<p>No predictions.</p>"}
<h2 id="training">Learning curves</h2>
{_figure("learning_curves", "validation loss per epoch (dotted: training loss)", figures)}
<h2 id="validation">Validation</h2>
{_validations(comparison, figures)}
{_active_learning(comparison, figures)}
<h2 id="cost">Cost</h2>
{_cost(designs)}
<h2 id="split">Held-out set</h2>
{_split(comparison)}
<h2 id="provenance">Provenance</h2>
{_provenance(provenance)}
<p id="figure-check" data-status="pending" class="muted">Checking figures…</p>
"""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{GENERATOR} {_e(__version__)}">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>{body}"
        f"<script>{CHECK_SCRIPT}</script></body></html>\n"
    )
    files = {"index.html": page.encode()}
    for name, content in figures.items():
        files[f"figures/{name}.png"] = content
    return files
