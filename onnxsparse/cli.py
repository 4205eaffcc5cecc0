"""The ``onnxsparse`` command line: the group, lazy command loading, error → exit-code mapping.

Commands live one per module in ``onnxsparse/commands/``; each exposes ``command`` (a click command). Exit
codes: 0 success, 1 user error (one red line on stderr, no traceback unless ``--verbose``, no output file
written) — usage errors included, 2 a validation gate failed.

Start-up: ``onnxsparse --help`` used to import every command module, and through them onnx, numpy and
onnxruntime (~1 s of a 0.85 s ... 1.2 s start). The group now lists commands from the package folder and
reads each one's short help from its source with ``ast`` (a few ms), importing a module only when its
command runs or shows its own help. No table to keep in step: a new module under ``commands/`` is a new
command. ``import onnxsparse.cli`` imports neither onnx nor numpy (tests/test_cli_startup.py).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import click

from onnxsparse import __version__
from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.render import WIDE_KEY

EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 1, 2

_COMMANDS_PACKAGE = "onnxsparse.commands"


def _decorated_command(tree: ast.Module) -> tuple[str, str] | None:
    """(name, docstring) of the function decorated ``@click.command("name")`` in a module's syntax tree."""
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and deco.args and isinstance(deco.args[0], ast.Constant)):
                continue
            func = deco.func
            if isinstance(func, ast.Attribute) and func.attr == "command" and isinstance(deco.args[0].value, str):
                return deco.args[0].value, ast.get_docstring(node) or ""
    return None


def _set_wide(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[WIDE_KEY] = True  # read by render.output_width (meta is shared by the whole context chain)


def _add_wide_option(command: click.Command) -> None:
    """Give every command ``--wide``: tables are not fitted to the terminal width (render.table)."""
    if not any(p.name == "wide" for p in command.params):
        command.params.append(
            click.Option(
                ["--wide"],
                is_flag=True,
                expose_value=False,
                callback=_set_wide,
                help="Do not shorten table cells to fit the terminal (COLUMNS); the JSON is never shortened.",
            )
        )


class LazyGroup(click.Group):
    """A click group whose commands are imported only when used; errors become one line and an exit code."""

    @cached_property
    def _lazy(self) -> dict[str, tuple[str, str]]:
        """Command name → (module name, help text), from the sources of ``onnxsparse/commands/``."""
        import onnxsparse.commands as pkg

        found: dict[str, tuple[str, str]] = {}
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_"):
                continue
            module = f"{_COMMANDS_PACKAGE}.{info.name}"
            path = Path(pkg.__path__[0]) / f"{info.name}.py"
            parsed = None
            with contextlib.suppress(OSError, SyntaxError, UnicodeDecodeError):  # else: import it to find out
                parsed = _decorated_command(ast.parse(path.read_text(encoding="utf-8")))
            if parsed is None:
                command = getattr(importlib.import_module(module), "command", None)
                if not isinstance(command, click.Command) or command.name is None:
                    continue
                parsed = (command.name, command.help or "")
            name, doc = parsed
            found[name] = (module, doc)
        return dict(sorted(found.items()))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in self._lazy:
            return None
        command = getattr(importlib.import_module(self._lazy[cmd_name][0]), "command", None)
        if not isinstance(command, click.Command):
            return None
        _add_wide_option(command)
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help`` from the sources' docstrings, without importing any command."""
        docs = {name: doc for name, (_, doc) in self._lazy.items()}
        docs.update({name: c.help or "" for name, c in self.commands.items()})
        if not docs:
            return
        limit = formatter.width - 6 - max(len(n) for n in docs)  # as click.Group.format_commands
        rows = [(name, click.Command(name, help=doc).get_short_help_str(limit)) for name, doc in sorted(docs.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Click's ``main`` with usage errors as one line and exit 1 (click prints 4 lines and exits 2)."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "onnxsparse"
            click.secho(f"error: {e.format_message().rstrip('.')} (see '{where} --help')", fg="red", err=True)
            rv = EXIT_ERROR
        except click.Abort:
            click.secho("aborted", fg="red", err=True)
            rv = EXIT_ERROR
        except click.ClickException as e:  # e.g. a FileError from a click.File option
            click.secho(f"error: {e.format_message()}", fg="red", err=True)
            rv = EXIT_ERROR
        code = rv if isinstance(rv, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError:
            raise  # main() words it
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


@click.group(
    cls=LazyGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
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
    if ctx.invoked_subcommand is None:  # bare `onnxsparse`: help, and success (2 means a failed gate here)
        click.echo(ctx.get_help())
        ctx.exit(EXIT_OK)
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
