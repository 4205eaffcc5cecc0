"""The text form of pipelines: the pass registry, option parsing and the grammar.

A pass is named on the command line by its registry key, and its options are its config dataclass's fields,
so the text and the Python API build the same objects with one name per option:

    gemm-to-conv,prune{pattern=2:4;exclude=head\\..*},validate{min-coverage=0.9}

Grammar: passes separated by top-level commas; options inside ``{...}`` separated by ``;``; values may be
quoted with '...' or "..." to contain ``;``, ``{`` or ``}``. Option names use dashes (``min-params``) and map
to dataclass fields with underscores.

Why apart from ``pipeline``: running passes needs none of this, and the grammar is the part a CLI change
touches. It stands on ``pass_base`` (``registry`` recognises passes by the ``Pass`` class; a pass's own
text, ``pass_text``, is there with the configs) and below ``pipeline``, whose ``Pipeline("text")`` reads it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from typing import Any

from onnxsparse.errors import OnnxSparseError
from onnxsparse.pass_base import Pass, PassConfig

# ---------------------------------------------------------------------------------------------- registry


def registry() -> dict[str, type[Pass[Any]]]:
    """CLI name → pass class, discovered from the modules of ``onnxsparse.passes`` (imports every one)."""
    found: dict[str, type[Pass[Any]]] = {}
    for module_name in _pass_modules():
        found.update(_passes_in(module_name))
    return dict(sorted(found.items()))


def get_pass(name: str) -> type[Pass[Any]]:
    """The pass class registered as ``name`` (a one-line error listing the known names otherwise).

    The module named like the pass (``gemm-to-conv`` → ``passes/gemm_to_conv.py``, the convention of every
    pass here) is imported alone, so a pipeline loads only its own passes: ``prune,validate`` never pays for
    onnx-ir (~0.3 s of import, sympy included), which the graph-rewriting passes need. Any other name falls
    back to importing them all.
    """
    guess = name.replace("-", "_")
    if guess in _pass_modules():
        found = _passes_in(guess)
        if name in found:
            return found[name]
    reg = registry()
    if name not in reg:
        raise OnnxSparseError(f"unknown pass '{name}' (known: {', '.join(reg)})")
    return reg[name]


def _pass_modules() -> list[str]:
    """Names of the modules of ``onnxsparse.passes`` (read from the folder, none imported)."""
    import onnxsparse.passes as pkg

    infos = pkgutil.iter_modules(pkg.__path__)
    return sorted(i.name for i in infos if not i.name.startswith("_"))


def _passes_in(module_name: str) -> dict[str, type[Pass[Any]]]:
    """The pass classes a module of ``onnxsparse.passes`` defines, by CLI name."""
    module = importlib.import_module(f"onnxsparse.passes.{module_name}")
    found: dict[str, type[Pass[Any]]] = {}
    for obj in vars(module).values():
        # ``types.GenericAlias`` (``tuple[int, ...]`` in a module namespace) passes ``isinstance(.., type)``
        # on Python 3.10, and issubclass then raises: exclude it explicitly.
        is_class = isinstance(obj, type) and not isinstance(obj, types.GenericAlias)
        is_pass = is_class and issubclass(obj, Pass) and obj is not Pass
        if is_pass and getattr(obj, "name", None) and obj.__module__ == module.__name__:
            found[obj.name] = obj
    return found


# ---------------------------------------------------------------------------------------------- grammar


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside braces and quotes."""
    parts, buf, depth, quote = [], [], 0, ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and i + 1 < len(text):
                buf.append(text[i : i + 2])
                i += 2
                continue
            if c == quote:
                quote = ""
            buf.append(c)
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif c == "{":
            depth += 1
            buf.append(c)
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise OnnxSparseError(f"unbalanced '}}' in pipeline '{text}'")
            buf.append(c)
        elif c == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    if quote:
        raise OnnxSparseError(f"unterminated quote in '{text}'")
    if depth:
        raise OnnxSparseError(f"unbalanced '{{' in pipeline '{text}'")
    parts.append("".join(buf))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace("\\" + value[0], value[0])
    return value


def config_fields(cls: type[PassConfig]) -> dict[str, dataclasses.Field[Any]]:
    """Option name (dashed) → dataclass field."""
    return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}


def coerce(f: dataclasses.Field[Any], raw: str, owner: type[PassConfig]) -> Any:
    """Turn option text into the field's type (bool/int/float/str/tuple[str, ...], Optional of those)."""
    hints = typing.get_type_hints(owner)
    tp = hints[f.name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("", "none", "null"):
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    name = f.name.replace("_", "-")
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if origin in (tuple, list):
            items = tuple(_unquote(x) for x in _split_top(raw, ",") if x.strip())
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            return tuple(inner(x) for x in items) if inner in (int, float) else items
        if tp is str:
            return raw
    except ValueError:
        raise OnnxSparseError(f"option {name}: cannot read '{raw}' as {getattr(tp, '__name__', tp)}") from None
    raise OnnxSparseError(f"option {name} has unsupported type {tp}")


def make_pass(name: str, options: dict[str, str]) -> Pass[Any]:
    """Build a pass from its CLI name and text options (validated against its config)."""
    cls = get_pass(name)
    fields = config_fields(cls.config_cls)
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        if key.replace("_", "-") not in fields:
            known = ", ".join(fields) or "none"
            raise OnnxSparseError(f"pass '{name}' has no option '{key}' (options: {known})")
        f = fields[key.replace("_", "-")]
        kwargs[f.name] = coerce(f, raw, cls.config_cls)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise OnnxSparseError(f"pass '{name}': {e}") from e


def parse_pipeline(text: str) -> list[Pass[Any]]:
    """``gemm-to-conv,prune{pattern=2:4;exclude=head.*}`` → the same pass objects the API builds."""
    passes: list[Pass[Any]] = []
    for item in _split_top(text, ","):
        item = item.strip()
        if not item:
            continue
        if "{" in item:
            if not item.endswith("}"):
                raise OnnxSparseError(f"bad pipeline item '{item}': text after '}}'")
            name, body = item[: item.index("{")].strip(), item[item.index("{") + 1 : -1]
        else:
            name, body = item, ""
        options: dict[str, str] = {}
        for opt in _split_top(body, ";"):
            if not opt.strip():
                continue
            if "=" not in opt:
                raise OnnxSparseError(f"bad option '{opt.strip()}' in '{item}': expected key=value")
            key, value = opt.split("=", 1)
            options[key.strip()] = _unquote(value)
        passes.append(make_pass(name, options))
    if not passes:
        raise OnnxSparseError("empty pipeline")
    return passes
