"""``onnxsparse finetune``: retrain a pruned model with its n:m masks fixed, or run a progressive schedule.

Two forms:

- ``finetune PRUNED.onnx --masks masks.npz --data train.npz --teacher dense.onnx -o OUT`` fine-tunes an
  already pruned model (masks from ``prune{masks=masks.npz}``);
- ``finetune DENSE.onnx --schedule 3:4,2:4 --data train.npz -o OUT`` runs prune → fine-tune for each pattern
  (the dense input is the distillation teacher), then checks the last pattern with ``validate``.

Training needs ONNX Runtime training, installed apart from your onnxruntime by ``onnxsparse setup-training``
(or on the fly with ``--install-runtime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from onnxsparse.commands._common import MODEL_ARG, json_option
from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune.options import DEFAULT_TRAIN
from onnxsparse.render import table, write_json

if TYPE_CHECKING:  # onnx and numpy load inside the command only (``--help`` stays light)
    from onnxsparse.pipeline import Pipeline


@click.command("finetune")
@MODEL_ARG
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Training data .npz: one array per model input (first axis = samples), plus labels for mse/ce.",
)
@click.option(
    "--masks",
    type=click.Path(dir_okay=False, path_type=str),
    help="Masks .npz from prune{masks=...} (initializer name → bool, True = kept). Not with --schedule.",
)
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False, path_type=str),
    help="Dense model whose outputs the student learns (loss distill). With --schedule: MODEL.",
)
@click.option(
    "--schedule",
    metavar="N:M,...",
    help="Progressive sparsity: prune to each pattern in turn and fine-tune after each, e.g. 3:4,2:4.",
)
@click.option("--steps", type=int, help="Optimizer steps per fine-tune (default: one epoch).")
@click.option("--epochs", type=float, help="Passes over the data per fine-tune (instead of --steps).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak AdamW learning rate (cosine decay).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per step.")
@click.option(
    "--loss",
    type=click.Choice(["distill", "mse", "ce"]),
    default="distill",
    show_default=True,
    help="distill: MSE to the teacher's outputs; mse / ce: against --labels.",
)
@click.option("--labels", metavar="KEY", help="Data key of the labels (loss mse / ce).")
@click.option(
    "--outputs",
    metavar="NAME,...",
    help="Model outputs the loss uses (default: all float outputs for distill, the first for mse/ce).",
)
@click.option(
    "--train",
    "train_sets",
    metavar="SET,...",
    default=",".join(DEFAULT_TRAIN),
    show_default=True,
    help="What trains: weights (the masked weights), biases (of the masked layers), norms "
    "(normalisation scales/shifts), embeddings (Gather tables).",
)
@click.option(
    "--mask-input",
    metavar="NAME",
    help="Input marking real positions (attention mask, 0/1): losses "
    "average over them only, and batches are trimmed to their longest row (dynamic sequence dim).",
)
@click.option(
    "--bucket-by-length",
    is_flag=True,
    help="Batches of similar lengths (needs --mask-input); seeded, reproducible order.",
)
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False, path_type=str),
    help="Eval .npz (same layout as --data): eval loss and cosine to the teacher, as a curve.",
)
@click.option(
    "--eval-every",
    type=int,
    default=0,
    show_default=True,
    help="Evaluate every N steps (0: at the start and the end only).",
)
@click.option(
    "--threads",
    type=int,
    default=0,
    show_default=True,
    help="Intra-op threads for training and the teacher (0: one per core).",
)
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear learning-rate warm-up steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order.")
@click.option(
    "--install-runtime",
    is_flag=True,
    help="Install ONNX Runtime training into onnxsparse's cache first if it is missing.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the fine-tuned model (never the input; written only on success).",
)
@json_option
def command(
    model: str,
    data: str,
    masks: str | None,
    teacher: str | None,
    schedule: str | None,
    steps: int | None,
    epochs: float | None,
    lr: float,
    batch_size: int,
    loss: str,
    labels: str | None,
    outputs: str | None,
    train_sets: str,
    mask_input: str | None,
    bucket_by_length: bool,
    eval_data: str | None,
    eval_every: int,
    threads: int,
    weight_decay: float,
    warmup: int,
    seed: int,
    install_runtime: bool,
    output: Path,
    json_path: str | None,
) -> None:
    """Fine-tune MODEL with fixed n:m masks (ONNX Runtime training) and write the result to OUTPUT.

    \b
    Examples:
      onnxsparse run dense.onnx -p 'prune{masks=masks.npz}' -o pruned.onnx
      onnxsparse finetune pruned.onnx --masks masks.npz --teacher dense.onnx --data train.npz --steps 2000 -o ft.onnx
      onnxsparse finetune dense.onnx --schedule 3:4,2:4 --data train.npz --epochs 2 -o sparse.onnx
      onnxsparse finetune pruned.onnx --masks masks.npz --data train.npz --loss ce --labels label -o ft.onnx
      onnxsparse finetune pruned.onnx --masks masks.npz --teacher dense.onnx --data train.npz \\
          --mask-input attention_mask --bucket-by-length --eval-data eval.npz --eval-every 50 -o ft.onnx

    The output has MODEL's nodes, initializer names, opset and IR version; masked entries are exactly zero.
    """
    from onnxsparse.finetune import run as training
    from onnxsparse.grammar import get_pass
    from onnxsparse.ir.model_io import load_model, save_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.pipeline import Pass, PassContext, Pipeline

    if schedule and masks:
        raise OnnxSparseError("--schedule prunes as it goes: give either --schedule or --masks, not both")
    if not schedule and not masks:
        raise OnnxSparseError("give --masks masks.npz (from prune{masks=...}) or a --schedule such as 3:4,2:4")
    if install_runtime and training.find_runtime() is None:
        click.echo(
            f"installing {training.training_worker.RUNTIME_PACKAGE}=={training.training_worker.RUNTIME_VERSION}"
            f" into {training.runtime_dir()} ...",
            err=True,
        )
        training.install_runtime()
    check_outputs(
        [model, data, masks, teacher, eval_data], [("-o", output), ("--json", json_path)], output_model=output
    )
    training.require_runtime()
    m = load_model(model, lazy=True)
    if schedule and loss == "distill" and teacher is None:
        teacher = model
    ft_options: dict[str, Any] = dict(
        data=data,
        teacher=teacher,
        steps=steps,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        loss=loss,
        labels=labels,
        outputs=tuple(o.strip() for o in outputs.split(",") if o.strip()) if outputs else (),
        train=tuple(t.strip() for t in train_sets.split(",")),
        mask_input=mask_input,
        bucket_by_length=bucket_by_length,
        eval_data=eval_data,
        eval_every=eval_every,
        threads=threads,
        weight_decay=weight_decay,
        warmup=warmup,
        seed=seed,
    )
    finetune_cls = get_pass("finetune")
    passes: list[Pass[Any]] = []
    patterns: list[str] = []
    if schedule:
        from onnxsparse.sparsity import parse_pattern

        patterns = [pat.strip() for pat in schedule.split(",") if pat.strip()]
        for pat in patterns:
            parse_pattern(pat)
        prune_cls = get_pass("prune")
        for pat in patterns:
            passes += [prune_cls(pattern=pat), finetune_cls(**ft_options)]
        passes.append(get_pass("validate")(pattern=patterns[-1]))
    else:
        passes.append(finetune_cls(masks=masks, **ft_options))
    pipeline = Pipeline(passes)
    ctx = PassContext(progress=True, calibration=data)  # a bar on a TTY, a line every 30 s in a log
    before = None
    if not schedule:  # a schedule's fine-tunes check their inputs after the prune before them
        training.check_inputs(m, data, passes[0].config.options(), teacher, eval_data)
    if not schedule and loss == "distill" and teacher:
        before = training.output_error(m, teacher, data, mask_input=mask_input)
    result = pipeline.run(m, ctx)
    after = (
        training.output_error(result.model, teacher, data, mask_input=mask_input)
        if loss == "distill" and teacher
        else None
    )
    save_model(result.model, output)

    report: dict[str, Any] = {
        **result.to_dict(),
        "output": str(output),
        "pipeline": pipeline.text(),
        "output_mse_to_teacher_before": before,
        "output_mse_to_teacher_after": after,
        # one entry per fine-tune stage: its eval curve, what trained, how batches were shaped, where time went
        "finetune": [
            {k: r.report.details.get(k) for k in ("steps", "curve", "train_sets", "batching", "timing")}
            for p, r in zip(pipeline.passes, result.results, strict=False)
            if p.name == "finetune"
        ],
    }
    if json_path == "-":
        write_json(report, "-")
        return
    click.echo(_render(pipeline, result, patterns))
    if after is not None:
        masked = " (masked)" if mask_input else ""
        click.echo(f"output MSE to the teacher{masked}: {'' if before is None else f'{before:.4g} -> '}{after:.4g}")
    click.echo(f"wrote {output} in {result.seconds:.1f}s")
    if json_path:
        write_json(report, json_path)


def _render(pipeline: Pipeline, result: Any, patterns: list[str]) -> str:
    """The stages table, what each fine-tune trained and how it batched, the eval curve, validate's summary."""
    rows: list[tuple[Any, ...]] = []
    lines: list[str] = []
    stage = 0
    for p, r in zip(pipeline.passes, result.results, strict=False):
        d = r.report.details
        if p.name == "prune":
            stage += 1
            rows.append((stage, "prune", d.get("pattern", ""), len(r.report.changed), "", "", f"{r.seconds:.1f}"))
        elif p.name == "finetune":
            first = "" if d.get("first_loss") is None else f"{d['first_loss']:.4g}"
            last = "" if d.get("last_loss") is None else f"{d['last_loss']:.4g}"
            pattern = patterns[stage - 1] if patterns else "masks"
            rows.append(
                (
                    stage or 1,
                    "finetune",
                    pattern,
                    len(r.report.changed),
                    d.get("steps", 0),
                    f"{first} -> {last}",
                    f"{r.seconds:.1f}",
                )
            )
            label = f"stage {stage or 1} fine-tune"
            sets = d.get("train_sets") or {}
            if sets:
                lines.append(f"{label} trained: " + ", ".join(f"{k} {v}" for k, v in sets.items()))
            b = d.get("batching") or {}
            if b.get("mask_input"):
                trimmed = ", ".join(b.get("trimmed") or []) or f"none ({b.get('untrimmed_reason')})"
                fed, full = b.get("tokens_fed", 0), b.get("tokens_untrimmed", 0)
                share = f", {fed / full:.0%} of the padded positions fed" if full else ""
                lines.append(
                    f"{label}: loss masked by {b['mask_input']}; trimmed: {trimmed}"
                    f"{'; bucketed by length' if b.get('bucketed') else ''}{share}"
                )
            curve = d.get("curve") or []
            if curve:
                has_cos = any("cosine" in c for c in curve)
                header = ["step", "eval loss", *(["cosine to teacher"] if has_cos else [])]
                lines.append(f"{label} eval curve:")
                lines.append(
                    table(
                        [(c["step"], f"{c['loss']:.5g}", *([f"{c['cosine']:.5f}"] if has_cos else [])) for c in curve],
                        header,
                    )
                )
        elif p.name == "validate":
            s = d.get("summary", {})
            if s:
                basis = s.get("coverage_basis", "flops")
                lines.append(
                    f"validate {patterns[-1] if patterns else ''}: {s.get('sparse', 0)}/{s.get('layers', 0)} "
                    f"layers sparse, coverage {float(s.get('coverage', 0.0)):.1%} ({basis}-weighted; "
                    "details in --json)"
                )
    return "\n".join([table(rows, ["stage", "pass", "pattern", "tensors", "steps", "loss", "seconds"]), *lines])
