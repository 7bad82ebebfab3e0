"""YAML with line numbers: every mapping key and value of a document keeps the line it came from.

``load_with_lines(text)`` returns the plain Python data and a map from paths (tuples of keys and list
indices) to 1-based line numbers, so that a validator can report *where* each problem is. Duplicate
keys are an error (PyYAML silently keeps the last one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[Any, ...]


@dataclass(frozen=True)
class Problem:
    """One mistake in a spec: where (line, dotted path) and what."""

    line: int | None
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


@dataclass
class Lines:
    """Line numbers of the paths of a document (the key's line for mapping entries)."""

    by_path: dict[Path, int] = field(default_factory=dict)

    def of(self, path: Path) -> int | None:
        """The line of ``path``, or of its closest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.by_path:
                return self.by_path[path]
            path = path[:-1]
        return self.by_path.get((), None)


class SpecSyntaxError(ValueError):
    """The text is not YAML (with the line of the error)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def dotted(path: Path) -> str:
    """``("designs", "qeq", "epochs")`` → ``designs.qeq.epochs``; list indices as ``[i]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _walk(node: yaml.Node, path: Path, lines: Lines, loader: yaml.SafeLoader) -> Any:
    lines.by_path.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise SpecSyntaxError(Problem(key_node.start_mark.line + 1, dotted(path), "unhashable key"))
            if key in out:
                raise SpecSyntaxError(
                    Problem(key_node.start_mark.line + 1, dotted((*path, key)), "duplicate key")
                )
            lines.by_path[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _walk(value_node, (*path, key), lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*path, i), lines, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_with_lines(text: str) -> tuple[Any, Lines]:
    """Parse one YAML document; return the data and the line of every path.

    :raises SpecSyntaxError: not YAML, several documents, or a duplicate key.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines = Lines()
        data = {} if node is None else _walk(node, (), lines, loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise SpecSyntaxError(Problem(line, "", f"not valid YAML: {exc.problem or exc}")) from exc
    except yaml.YAMLError as exc:
        raise SpecSyntaxError(Problem(None, "", f"not valid YAML: {exc}")) from exc
    finally:
        loader.dispose()
    return data, lines
