"""Reading the user's files with bounds: regular files only, a size limit, YAML aliases and JSON nesting bounded.

Recipes, templates and DeepSpeed JSON files are small: a /dev/zero or a "billion laughs" YAML must be an error in
the first second, not an out-of-memory kill. Every problem is a UserError naming the file (and line).
"""
from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

import yaml

from .errors import UserError

CONFIG_FILE_LIMIT = 4 << 20  # recipes, templates, DeepSpeed configs: far larger than any real one
YAML_NODE_LIMIT = 100_000  # values a YAML document may hold once its aliases are expanded
YAML_DEPTH_LIMIT = 64  # nesting of a YAML document (a recipe is 3 or 4 levels deep)
JSON_DEPTH_LIMIT = 100  # nesting of a JSON row; Python's parser recurses and would overflow past ~1000


def read_text(path: str, what: str, limit: int = CONFIG_FILE_LIMIT) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes (a leading byte-order mark dropped)."""
    return decode_text(read_bytes(path, what, limit), path)


def read_stdin_text(what: str, limit: int) -> str:
    """Standard input as UTF-8 text of at most `limit` bytes (for `--file -`)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None or sys.stdin.closed:
        raise UserError(f"standard input is closed; cannot read the {what} from it")
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"standard input: more than {limit >> 20} MB of {what}; give a file")
    return decode_text(data, "standard input")


def decode_text(data: bytes, path: str) -> str:
    """UTF-8 bytes as text; an error names the line (and the byte within it), a byte-order mark is dropped."""
    try:
        text = data.decode("utf-8")  # decoded whole, so that an error's offset is the file's
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        column = e.start - (e.object.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {column} of the line)") from None
    return text.removeprefix("\ufeff")


def read_bytes(path: str, what: str, limit: int | None = CONFIG_FILE_LIMIT) -> bytes:
    """The bytes of a regular file (not a folder, device or pipe) of at most `limit` bytes."""
    check_regular_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1) if limit is not None else f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
    if limit is not None and len(data) > limit:
        raise UserError(f"{path}: larger than {limit >> 20} MB; a {what} file is small (is this the right file?)")
    return data


def check_regular_file(path: str, what: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a folder, not a {what} file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: is not a regular file (a device or a pipe); give a {what} file")


def read_yaml_file(path: str, what: str) -> tuple[Any, dict[str, Any]]:
    """(value, lines) of a YAML file read safely; lines maps dotted keys to line numbers, and its
    "__duplicates__" entry lists (line, message) for keys given twice. Raises UserError naming the file."""
    return parse_yaml(read_text(path, what), path)


def parse_yaml(text: str, path: str) -> tuple[Any, dict[str, Any]]:
    """(value, lines) of YAML text read safely: aliases may not expand past YAML_NODE_LIMIT values, nor the
    document nest deeper than YAML_DEPTH_LIMIT; measured on the composed nodes, before anything is expanded."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_yaml_size(root, path)
        lines = _key_lines(root)
        return yaml.safe_load(text), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:  # PyYAML composes recursively: a few hundred levels exhaust Python's stack
        raise UserError(f"{path}: nested more than {YAML_DEPTH_LIMIT} levels deep; a recipe or template is "
                        f"shallow (is this the right file?)") from None


def parse_yaml_value(text: str, where: str) -> Any:
    """One YAML value (a command-line override's), bounded like a file; UserError naming `where` if invalid."""
    return parse_yaml(text, where)[0]


def _check_yaml_size(root, path: str) -> None:
    sizes: dict[int, int] = {}
    try:
        size = _expanded_size(root, sizes, set(), 0)
    except ValueError:
        raise UserError(f"{path}: a YAML alias refers to a node that contains it (a value inside itself)") from None
    if size > YAML_NODE_LIMIT:
        raise UserError(f"{path}: its YAML aliases expand to more than {YAML_NODE_LIMIT:,} values ({size:,}); "
                        f"write the values out")


def _expanded_size(node, sizes: dict[int, int], active: set[int], depth: int) -> int:
    """Values in the document once aliases are expanded (a shared node counts each time it is used), computed
    once per node, so an alias bomb is measured without being expanded. ValueError for a node inside itself."""
    if depth > YAML_DEPTH_LIMIT:
        raise RecursionError
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        raise ValueError("recursive alias")
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes, active, depth + 1) + _expanded_size(v, sizes, active, depth + 1)
                       for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, sizes, active, depth + 1) for v in node.value)
    else:
        size = 1
    active.discard(id(node))
    sizes[id(node)] = min(size, YAML_NODE_LIMIT + 1)
    return sizes[id(node)]


def _key_lines(node, prefix: str = "", out: dict | None = None) -> dict[str, Any]:
    """Map each dotted key path (lists as key[i]) to the 1-based line where it appears."""
    out = {"__duplicates__": []} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            if key in out:  # YAML would silently keep the last one
                out["__duplicates__"].append((key_node.start_mark.line + 1,
                                              f"{key}: duplicate key (first at line {out[key]})"))
            out[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{prefix}[{i}]"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}[{i}]", out)
    return out


def parse_json(text: str):
    """json.loads with the nesting bounded: ValueError (a JSONDecodeError, or too deep) for a bad value."""
    depth = deepest = 0
    if text.count("[") + text.count("{") > JSON_DEPTH_LIMIT:  # cheap check first: most rows are shallow
        in_string = escaped = False
        for ch in text:
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch in "]}":
                depth -= 1
        if deepest > JSON_DEPTH_LIMIT:
            raise ValueError(f"nested more than {JSON_DEPTH_LIMIT} levels deep")
    return json.loads(text)


def read_json_file(path: str, what: str, limit: int = CONFIG_FILE_LIMIT):
    """A small JSON file (a DeepSpeed config), bounded like the others."""
    try:
        return parse_json(read_text(path, what, limit))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
