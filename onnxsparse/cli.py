"""The ``onnxsparse`` command line: the group, shared options, error → exit-code mapping.

Commands live one per module in ``onnxsparse/commands/``; each exposes ``command`` (a click command) and
is added here. Exit codes: 0 success, 1 user error (one red line on stderr, no traceback unless
``--verbose``, no output file written), 2 a validation gate failed.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from onnxsparse import __version__
from onnxsparse.errors import GateFailure, OnnxSparseError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 1, 2


class _Group(click.Group):
    """A click group that turns OnnxSparseError into one line + exit 1 (exit 2 for gate failures)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            # click exits 2 on usage errors, but 2 means "a gate failed" here: a bad option is an error (1).
            e.show()
            ctx.exit(EXIT_ERROR)
        except GateFailure as e:
            click.secho(f"gate failed: {e}", fg="red", err=True)
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            ctx.exit(EXIT_GATE)
        except OnnxSparseError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            ctx.exit(EXIT_ERROR)
        except (MemoryError, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # `onnxsparse passes | head`: the reader left; nothing to report
            sys.stderr.close()
            ctx.exit(EXIT_ERROR)
        except OSError as e:
            click.secho(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), fg="red", err=True)
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            ctx.exit(EXIT_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="onnxsparse")
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks of errors.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Prepare ONNX models for 2:4 structured-sparse inference on NVIDIA GPUs.

    \b
    Typical flow:
      onnxsparse inspect model.onnx                      # what is in it, which layers carry weights
      onnxsparse run model.onnx -p prune,validate -o sparse.onnx
      onnxsparse check sparse.onnx --min-coverage 0.9    # CI gate: exit 2 when it fails
      onnxsparse passes                                  # every pass and its options

    Exit codes: 0 ok, 1 error (bad input or option), 2 a validation gate failed.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_commands() -> None:
    import onnxsparse.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_add_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
