"""Options and helpers shared by several commands (one definition, so every command spells them alike)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

MODEL_ARG = click.argument("model", type=click.Path(dir_okay=False, path_type=str))


def shapes_option(f: F) -> F:
    return click.option(
        "--shapes",
        metavar="NAME:DxD,...",
        help="Concrete shapes for symbolic input dims, trtexec style, e.g. input:1x3x640x640,mask:1x128.",
    )(f)


def json_option(f: F) -> F:
    return click.option(
        "--json", "json_path", metavar="PATH", help="Also write the report as JSON to PATH ('-' for stdout only)."
    )(f)


def show_progress() -> bool:
    """Commands always report progress (``PassContext.progress``); ``onnxsparse.progress`` picks the form: a
    bar when a person watches stderr, a plain line at least every 30 s when it goes to a log (issue 12: a
    fine-tune sent to a file printed nothing for 25 minutes). Library callers keep the default False."""
    return True
