"""Reading YAML a user wrote, with bounds: file size, nesting depth and alias expansion.

PyYAML builds aliases by reference, so a 600-byte "billion laughs" file loads in microseconds
into a value that expands to 10^9 nodes; walking or printing it is what runs out of memory.
The node graph is therefore measured before anything is constructed: a file whose expanded
tree is larger than MAX_NODES, deeper than MAX_DEPTH or recursive is refused in one line.
`short_repr` bounds what an error message prints of a value.
"""

from __future__ import annotations

import reprlib
from pathlib import Path

import yaml

from monitor.errors import UsageError

MAX_BYTES = 1 << 20  # a configuration file, not a data set
MAX_DEPTH = 64
MAX_NODES = 100_000  # after expanding every alias

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxstring = _repr.maxother = 60


def short_repr(value: object, limit: int = 80) -> str:
    """repr() for error messages: bounded in depth, items and length, whatever the value."""
    if isinstance(value, str):  # a long path is still shown up to the limit
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail because of the value in it
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class YamlLimitError(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_DEPTH (instead of a RecursionError) and checks
    the expanded size of the node graph before constructing Python objects from it."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep "
                                     f"(line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _measure(node, {}, set(), 0)
        return node


def _measure(node, memo: dict[int, tuple[int, int]], path: set[int], depth: int) -> tuple[int, int]:
    """(expanded node count, height) of `node`, memoised per node so shared aliases cost once."""
    key = id(node)
    if key in path:
        raise YamlLimitError("an alias refers to a node that contains it (a recursive structure)")
    if key in memo:
        size, height = memo[key]
    else:
        if depth > MAX_DEPTH:
            raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded")
        path.add(key)
        size, height = 1, 0
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            s, h = _measure(child, memo, path, depth + 1)
            size += s
            height = max(height, h + 1)
            if size > MAX_NODES:
                raise YamlLimitError(f"expands to more than {MAX_NODES} values once aliases are "
                                     "followed (an alias bomb?)")
        path.discard(key)
        memo[key] = (size, height)
    if depth + height > MAX_DEPTH:
        raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded")
    return size, height


def load_yaml_text(text: str, where: str) -> object:
    """Parse YAML with the bounds above; UsageError naming `where` for anything wrong."""
    if len(text) > MAX_BYTES:
        raise UsageError(f"{where}: over {MAX_BYTES >> 10} KiB; not a configuration file")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(f"{where}: not valid YAML ({detail[:300]})") from None
    except RecursionError:  # belt and braces: the depth bound should make this unreachable
        raise UsageError(f"{where}: not valid YAML (nested too deeply)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer of 5000 digits
        raise UsageError(f"{where}: a value cannot be read ({str(exc)[:200]})") from None


def load_yaml_file(path: str | Path) -> object:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: config file not found")
    try:
        if p.stat().st_size > MAX_BYTES:
            raise UsageError(f"{p}: over {MAX_BYTES >> 10} KiB; not a configuration file")
        text = p.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not a text file") from None
    except OSError as exc:
        raise UsageError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    return load_yaml_text(text, str(p))
