"""``onnxsparse finetune`` and ``onnxsparse setup-training`` end to end through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from training_support import (
    FINETUNE_FIXTURE,
    encoder_data,
    example_inputs,
    mse,
    outputs,
    tiny_encoder,
    training_runtime,  # noqa: F401
    write_data,
)

from onnxsparse.cli import main
from onnxsparse.ir.model_io import load_model

pytestmark = pytest.mark.usefixtures("training_runtime")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxsparse", *args], capture_output=True, text=True, check=False)


def test_prune_with_masks_then_finetune_then_check(tmp_path: Path) -> None:
    data = write_data(tmp_path / "train.npz")
    masks, pruned, out = tmp_path / "masks.npz", tmp_path / "pruned.onnx", tmp_path / "ft.onnx"
    r = _cli("run", str(FINETUNE_FIXTURE), "-p", f"prune{{masks={masks}}}", "-o", str(pruned))
    assert r.returncode == 0, r.stderr
    digest = _sha(pruned)
    r = _cli(
        "finetune",
        str(pruned),
        "--masks",
        str(masks),
        "--teacher",
        str(FINETUNE_FIXTURE),
        "--data",
        str(data),
        "--steps",
        "300",
        "--lr",
        "3e-3",
        "--batch-size",
        "64",
        "-o",
        str(out),
        "--json",
        str(tmp_path / "report.json"),
    )
    assert r.returncode == 0, r.stderr
    assert "output MSE to the teacher" in r.stdout and "wrote" in r.stdout
    assert _sha(pruned) == digest, "the input is never modified"
    report = json.loads((tmp_path / "report.json").read_text())
    before, after = report["output_mse_to_teacher_before"], report["output_mse_to_teacher_after"]
    assert after < before / 2
    x = example_inputs(512, seed=31)
    y = outputs(load_model(FINETUNE_FIXTURE), x)
    assert mse(outputs(load_model(out), x), y) < mse(outputs(load_model(pruned), x), y) / 2
    onnx.checker.check_model(str(out), full_check=True)
    r = _cli("check", str(out), "--require-all")
    assert r.returncode == 0, r.stdout + r.stderr


def test_schedule_runs_prune_finetune_twice(tmp_path: Path) -> None:
    data = write_data(tmp_path / "train.npz", n=1024)
    out = tmp_path / "sparse.onnx"
    result = CliRunner().invoke(
        main,
        [
            "finetune",
            str(FINETUNE_FIXTURE),
            "--schedule",
            "3:4,2:4",
            "--data",
            str(data),
            "--steps",
            "60",
            "--lr",
            "3e-3",
            "-o",
            str(out),
            "--json",
            "-",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [p["pass"] for p in report["passes"]] == ["prune", "finetune", "prune", "finetune", "validate"]
    assert report["passes"][2]["details"]["pattern"] == "2:4"
    assert report["passes"][-1]["details"]["summary"]["sparse"] == 3
    assert report["output_mse_to_teacher_after"] is not None
    w = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.count_nonzero(w["fc1.weight"]) == w["fc1.weight"].size // 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --masks"),
        (["--masks", "m.npz", "--schedule", "2:4"], "either --schedule or --masks"),
        (["--schedule", "5:4"], "bad sparsity pattern"),
        (["--masks", "missing.npz"], "no such masks file"),
    ],
)
def test_bad_invocations_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    data = write_data(tmp_path / "d.npz", n=16)
    np.savez(tmp_path / "m.npz", w=np.ones(4, bool))
    out = tmp_path / "out.onnx"
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(
            main, ["finetune", str(FINETUNE_FIXTURE), "--data", str(data), *args, "-o", str(out)]
        )
    finally:
        os.chdir(old)
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_runtime_tells_the_command_and_writes_nothing(tmp_path: Path) -> None:
    from onnxsparse.finetune import run as training

    rt = training.find_runtime()
    if rt is not None and rt.mode == "inprocess":
        pytest.skip("this environment's onnxruntime trains by itself")  # never in CI (plain onnxruntime)
    out = tmp_path / "out.onnx"
    env = {**os.environ, "ONNXSPARSE_TRAINING_RUNTIME": str(tmp_path / "none")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxsparse",
            "finetune",
            str(FINETUNE_FIXTURE),
            "--schedule",
            "2:4",
            "--data",
            str(write_data(tmp_path / "d.npz", n=16)),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode == 1
    assert "onnxsparse setup-training" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_setup_training_prints_and_reuses(tmp_path: Path, training_runtime) -> None:  # noqa: F811
    r = CliRunner().invoke(main, ["setup-training", "--print-command", "--target", str(tmp_path / "rt")])
    assert r.exit_code == 0
    assert "--target" in r.output and "onnxruntime-training-cpu==1.19.2" in r.output and "--no-deps" in r.output
    if training_runtime.mode == "subprocess":
        env = {**os.environ, "ONNXSPARSE_TRAINING_RUNTIME": str(training_runtime.path)}
        r2 = subprocess.run(
            [sys.executable, "-m", "onnxsparse", "setup-training"], capture_output=True, text=True, env=env, check=False
        )
        assert r2.returncode == 0 and "training runtime ready: onnxruntime-training 1.19.2" in r2.stdout


# ---------------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dense encoder, its 2:4-pruned copy with masks, and token data (train / eval)."""
    d = tmp_path_factory.mktemp("encoder")
    dense = tiny_encoder(d / "dense.onnx")
    masks, pruned = d / "masks.npz", d / "pruned.onnx"
    r = CliRunner().invoke(main, ["run", str(dense), "-p", f"prune{{masks={masks}}}", "-o", str(pruned)])
    assert r.exit_code == 0, r.output
    return {
        "dense": dense,
        "pruned": pruned,
        "masks": masks,
        "data": encoder_data(d / "train.npz"),
        "eval": encoder_data(d / "eval.npz", n=24, seed=9),
    }


def _encoder_args(f: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        str(f["pruned"]),
        "--masks",
        str(f["masks"]),
        "--teacher",
        str(f["dense"]),
        "--mask-input",
        "attention_mask",
        "--batch-size",
        "8",
        "-o",
        str(out),
        *extra,
    ]


def test_masked_finetune_prints_sets_batching_and_the_curve(encoder_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft.onnx"
    r = _cli(
        *_encoder_args(
            encoder_files,
            out,
            "--data",
            str(encoder_files["data"]),
            "--steps",
            "12",
            "--eval-data",
            str(encoder_files["eval"]),
            "--eval-every",
            "6",
            "--bucket-by-length",
            "--json",
            str(tmp_path / "r.json"),
        )
    )
    assert r.returncode == 0, r.stderr
    assert "trained: weights 6, biases 6, norms 6, embeddings 1" in r.stdout
    assert "loss masked by attention_mask; trimmed: attention_mask, input_ids; bucketed by length" in r.stdout
    assert "eval curve" in r.stdout and "cosine to teacher" in r.stdout and "{" not in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    (ft,) = report["finetune"]
    curve = ft["curve"]
    assert ft["train_sets"] == {"weights": 6, "biases": 6, "norms": 6, "embeddings": 1}
    assert ft["batching"]["trimmed"] == ["attention_mask", "input_ids"] and ft["batching"]["bucketed"]
    assert [p["step"] for p in curve] == [0, 6, 12] and all("cosine" in p and "loss" in p for p in curve)
    onnx.checker.check_model(str(out), full_check=True)


def test_progress_lines_without_a_tty() -> None:
    """Not a terminal (a log file): plain lines at least every 30 s with step/total, loss, lr, tokens/s, ETA,
    and a last line when done. The worker's events drive the real ``Progress`` with a fake clock."""
    import io

    from onnxsparse.finetune.events import Events

    now = [100.0]
    log = io.StringIO()
    events = Events(True, None, {}, progress_options={"stream": log, "tty": False, "clock": lambda: now[0]})
    events({"event": "start", "steps": 10})
    for step in range(1, 11):
        now[0] += 20.0  # 20 s a step: the first line at step 1 (past 5 s), then one every 30 s: steps 3, 5, 7, 9
        events({"event": "step", "step": step, "loss": 1.0 / step, "lr": 3e-4, "samples": 16, "tokens": 16 * 25})
    events.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 6, lines
    assert re.fullmatch(r"fine-tune 1/10 \(10%\) 0\.05 step/s ETA 03:00 loss=1 lr=0\.0003 tokens/s=20", lines[0])
    assert lines[1].startswith("fine-tune 3/10 (30%)")
    assert re.fullmatch(
        r"fine-tune 10/10 \(100%\) 0\.05 step/s done in 03:20 loss=0\.1 lr=0\.0003 tokens/s=20", lines[-1]
    )
    assert events.losses == [1.0 / s for s in range(1, 11)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mask": "token_type_ids"}, "mask input 'token_type_ids' is not a model input"),
        ({"attention_mask": lambda a: a * 3}, "holds 3: it must hold only 0 and 1"),
        ({"input_ids": lambda a: a.astype(np.int32)}, "input 'input_ids' is int32, the model takes int64"),
        ({"input_ids": lambda a: a[:, :, None]}, "has shape [96, 12, 1] (rank 3), the model takes rank 2"),
        ({"rename": True}, "has no array for model input 'input_ids'"),
        ({"eval": True}, "eval data"),
        ({"teacher": True}, "does not match the student's"),
    ],
)
def test_bad_transformer_inputs_are_one_line_errors(
    encoder_files: dict[str, Path], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    with np.load(encoder_files["data"]) as z:
        arrays = {k: z[k] for k in z.files}
    for key, fn in change.items():
        if key in arrays and callable(fn):
            arrays[key] = fn(arrays[key])
    if change.get("rename"):
        arrays["ids"] = arrays.pop("input_ids")
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)  # type: ignore[arg-type]
    out = tmp_path / "out.onnx"
    args = _encoder_args(
        encoder_files, out, "--data", str(encoder_files["data"] if change.get("eval") else bad), "--steps", "2"
    )
    if change.get("eval"):
        np.savez(bad, ids=arrays["input_ids"], attention_mask=arrays["attention_mask"])
        args += ["--eval-data", str(bad)]
    if "mask" in change:
        args[args.index("--mask-input") + 1] = str(change["mask"])
    if change.get("teacher"):
        args[args.index("--teacher") + 1] = str(tiny_encoder(tmp_path / "wide.onnx", hidden=20))
    digest = _sha(encoder_files["pruned"])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and "ONNXRuntimeError" not in result.output
    assert not out.exists() and _sha(encoder_files["pruned"]) == digest


def test_pipeline_form_checks_data_up_front(encoder_files: dict[str, Path], tmp_path: Path) -> None:
    with np.load(encoder_files["data"]) as z:
        np.savez(tmp_path / "bad.npz", input_ids=z["input_ids"][:, :, None], attention_mask=z["attention_mask"])
    out = tmp_path / "out.onnx"
    pipeline = (
        f"finetune{{data={tmp_path / 'bad.npz'};masks={encoder_files['masks']};"
        f"teacher={encoder_files['dense']};steps=2}}"
    )
    r = _cli("run", str(encoder_files["pruned"]), "-p", pipeline, "-o", str(out))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "(rank 3), the model takes rank 2" in err[0] and "InvalidArgument" not in err[0]
    assert not out.exists()


def test_schedule_summary_is_rendered_not_a_dict(tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.npz", n=256)
    r = _cli(
        "finetune",
        str(FINETUNE_FIXTURE),
        "--schedule",
        "3:4,2:4",
        "--data",
        str(data),
        "--steps",
        "5",
        "-o",
        str(tmp_path / "out.onnx"),
    )
    assert r.returncode == 0, r.stderr
    assert "validate 2:4: 3/3 layers sparse, coverage 100.0% (flops-weighted" in r.stdout
    assert "{" not in r.stdout and "[" not in r.stdout


@pytest.mark.parametrize("clash", ["model", "model_data", "data", "teacher", "json_is_output"])
def test_outputs_never_overwrite_inputs(encoder_files: dict[str, Path], tmp_path: Path, clash: str) -> None:
    """Every path finetune writes (-o, its .data file, --json) differs from every input; checked before work."""
    out, report = tmp_path / "ft.onnx", tmp_path / "r.json"
    if clash == "model":
        out = encoder_files["pruned"]
    elif clash == "model_data":  # the external-data file the output model would be saved with
        report = Path(str(out) + ".data")
    elif clash == "data":
        report = encoder_files["data"]
    elif clash == "teacher":
        out = encoder_files["dense"]
    else:
        report = out
    before = {k: _sha(v) for k, v in encoder_files.items()}
    r = CliRunner().invoke(
        main,
        [
            *_encoder_args(encoder_files, out, "--data", str(encoder_files["data"]), "--steps", "2"),
            "--json",
            str(report),
        ],
    )
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and ("-o" in r.output or "--json" in r.output), r.output
    assert {k: _sha(v) for k, v in encoder_files.items()} == before
