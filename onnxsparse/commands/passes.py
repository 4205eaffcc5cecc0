"""``onnxsparse passes``: every registered pass and its options, generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import click

from onnxsparse.presets import DEFAULT_PIPELINE


def describe_passes() -> list[dict[str, Any]]:
    """Name, summary and options (name, type, default, doc) of each pass."""
    from onnxsparse.grammar import config_fields, registry

    out = []
    for name, cls in registry().items():
        hints = typing.get_type_hints(cls.config_cls)
        options = []
        for opt, f in config_fields(cls.config_cls).items():
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            options.append(
                {"name": opt, "type": _type_name(hints[f.name]), "default": default, "doc": f.metadata.get("doc", "")}
            )
        out.append({"name": name, "summary": cls.summary, "options": options})
    return out


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (tuple, list):
        return "list"
    if args and len(args) == 1:
        return _type_name(args[0])
    return getattr(tp, "__name__", str(tp))


@click.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def command(as_json: bool) -> None:
    """List every pass and its options (usable as NAME{opt=value;...} in -p pipelines)."""
    from onnxsparse.render import write_json

    data = describe_passes()
    if as_json:
        write_json(data, "-")
        return
    for p in data:
        click.echo(click.style(p["name"], bold=True) + f"  {p['summary']}")
        for o in p["options"]:
            default = "" if o["default"] in (None, "", ()) else f" (default: {o['default']})"
            click.echo(f"    {o['name']}={o['type']}{default}  {o['doc']}")
    click.echo(f"\nDefault pipeline of 'onnxsparse run': {DEFAULT_PIPELINE}")
    click.echo("Grammar: pass{key=value;key=value},pass  (quote values containing ; { } with '...').")
