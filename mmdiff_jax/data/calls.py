"""The config's data strings: one call (`config.data.source`) or calls joined by `|` (`config.data.transforms`).

  source:     "folder('/data/pets', labels=True)"
  transforms: "resize(64)|value_range(-1, 1)|masked_image(kind='patch', ratio=(0.1, 0.6), patch_size=8)"

As big_vision's `pp` strings, but parsed with `ast`, never evaluated: a call is a registered name with
literal arguments (numbers, strings, tuples, lists, dicts, None, booleans). Each name maps to a frozen
dataclass whose fields are the call's arguments, so a parsed call prints back as the string that makes it
(`render`), and a config can change one argument (`with_args`) without rewriting the string.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any


def _literal(node: ast.AST, key: str, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{key} {text!r}: arguments must be literals, got {ast.unparse(node)!r}") from None


def _build(node: ast.AST, registry: Mapping[str, type], key: str, text: str):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"{key} {text!r}: {ast.unparse(node)!r} is not a call such as name(arg, key=value)")
    name = node.func.id
    if name not in registry:
        raise ValueError(f"{key} {text!r}: unknown {name!r}; known: {', '.join(sorted(registry))}")
    args = [_literal(arg, key, text) for arg in node.args]
    kwargs = {keyword.arg: _literal(keyword.value, key, text) for keyword in node.keywords}
    try:
        return registry[name](*args, **kwargs)
    except TypeError as error:
        fields = ", ".join(field.name for field in dataclasses.fields(registry[name]))
        raise ValueError(f"{key} {text!r}: {name}({fields}): {error}") from None


def _expression(text: str, key: str) -> ast.AST:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"{key} {text!r} does not parse: {error.msg}") from None


def parse_call(text: str, registry: Mapping[str, type], key: str):
    """`text` ("name(args)") -> registry[name](args); ValueError naming `key` (the config key) otherwise."""
    return _build(_expression(text, key), registry, key, text)


def parse_pipe(text: str, registry: Mapping[str, type], key: str) -> tuple:
    """`text` ("a(..)|b(..)|..."; "" is none) -> the tuple of built calls, in order."""
    if not text.strip():
        return ()
    calls, node = [], _expression(text, key)
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        calls.append(node.right)
        node = node.left
    return tuple(_build(call, registry, key, text) for call in [node, *reversed(calls)])


def render(call) -> str:
    """The call string of a parsed dataclass: its name and the fields that differ from their defaults."""
    args = []
    for field in dataclasses.fields(call):
        value = getattr(call, field.name)
        if field.metadata.get("varargs"):  # a `*args` field (keep('image', 'mask'))
            args.extend(repr(item) for item in value)
        elif field.default is dataclasses.MISSING or value != field.default:
            args.append(f"{field.name}={value!r}")
    return f"{call.name}({', '.join(args)})"
