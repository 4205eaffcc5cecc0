"""``onnxsparse setup-training``: install ONNX Runtime training beside (not over) your onnxruntime.

``onnxruntime-training-cpu`` (1.19.2, its last release) provides the same ``onnxruntime`` module as the
inference package, so installing it into the environment would replace the user's onnxruntime. This command
installs it with ``pip --target`` into onnxsparse's cache (``$ONNXSPARSE_CACHE``, default
``~/.cache/onnxsparse``; ``$ONNXSPARSE_TRAINING_RUNTIME`` names the folder itself), where only the fine-tune
worker process looks for it.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("setup-training")
@click.option(
    "--target",
    type=click.Path(file_okay=False, path_type=Path),
    help="Install into this folder (then set ONNXSPARSE_TRAINING_RUNTIME to it).",
)
@click.option("--force", is_flag=True, help="Reinstall even where a runtime is already there.")
@click.option("--print-command", is_flag=True, help="Only print the pip command (for an offline or manual install).")
def command(target: Path | None, force: bool, print_command: bool) -> None:
    """Install the ONNX Runtime training runtime that `onnxsparse finetune` uses (about 35 MB, CPU)."""
    from onnxsparse.finetune import run as training

    if print_command:
        click.echo(" ".join(training.install_command(target)))
        return
    current = training.find_runtime()
    if current is not None and current.mode == "inprocess" and target is None and not force:
        click.echo(f"this environment's onnxruntime already trains: {current.describe()}")
        return
    rt = training.install_runtime(target, force=force)
    click.echo(f"training runtime ready: {rt.describe()}")
    if target is not None and Path(target).resolve() != training.runtime_dir().resolve():
        click.echo(f"set ONNXSPARSE_TRAINING_RUNTIME={Path(target).resolve()} so that finetune finds it")
