"""``onnxsparse finetune`` and ``onnxsparse setup-training`` end to end through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from training_support import (
    FINETUNE_FIXTURE,
    example_inputs,
    mse,
    outputs,
    training_runtime,  # noqa: F401
    write_data,
)

from onnxsparse.cli import main
from onnxsparse.model_io import load_model

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
    r = _cli("finetune", str(pruned), "--masks", str(masks), "--teacher", str(FINETUNE_FIXTURE), "--data",
             str(data), "--steps", "300", "--lr", "3e-3", "--batch-size", "64", "-o", str(out),
             "--json", str(tmp_path / "report.json"))
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
    result = CliRunner().invoke(main, ["finetune", str(FINETUNE_FIXTURE), "--schedule", "3:4,2:4", "--data",
                                       str(data), "--steps", "60", "--lr", "3e-3", "-o", str(out), "--json", "-"])
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
        result = CliRunner().invoke(main, ["finetune", str(FINETUNE_FIXTURE), "--data", str(data), *args,
                                           "-o", str(out)])
    finally:
        os.chdir(old)
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_runtime_tells_the_command_and_writes_nothing(tmp_path: Path) -> None:
    from onnxsparse import training

    rt = training.find_runtime()
    if rt is not None and rt.mode == "inprocess":
        pytest.skip("this environment's onnxruntime trains by itself")  # never in CI (plain onnxruntime)
    out = tmp_path / "out.onnx"
    env = {**os.environ, "ONNXSPARSE_TRAINING_RUNTIME": str(tmp_path / "none")}
    r = subprocess.run([sys.executable, "-m", "onnxsparse", "finetune", str(FINETUNE_FIXTURE), "--schedule", "2:4",
                        "--data", str(write_data(tmp_path / "d.npz", n=16)), "-o", str(out)],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 1
    assert "onnxsparse setup-training" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_setup_training_prints_and_reuses(tmp_path: Path, training_runtime) -> None:  # noqa: F811
    r = CliRunner().invoke(main, ["setup-training", "--print-command", "--target", str(tmp_path / "rt")])
    assert r.exit_code == 0
    assert "--target" in r.output and "onnxruntime-training-cpu==1.19.2" in r.output and "--no-deps" in r.output
    if training_runtime.mode == "subprocess":
        env = {**os.environ, "ONNXSPARSE_TRAINING_RUNTIME": str(training_runtime.path)}
        r2 = subprocess.run([sys.executable, "-m", "onnxsparse", "setup-training"], capture_output=True, text=True,
                            env=env, check=False)
        assert r2.returncode == 0 and "training runtime ready: onnxruntime-training 1.19.2" in r2.stdout
