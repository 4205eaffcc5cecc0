"""Shared pieces of the fine-tune tests: the training-runtime fixture, the trained fixture, and error metrics.

``training_runtime`` (session scope) finds ONNX Runtime training or installs it into onnxsparse's cache
(``$ONNXSPARSE_CACHE``, default ``~/.cache/onnxsparse``) with ``onnxsparse.training.install_runtime`` — a
~9 MB wheel from PyPI, a few seconds. Where the install fails the tests skip, except in CI (``CI=true``),
where a missing runtime is a failure: the fine-tune tests must never be skipped there.

Test modules use it with ``from training_support import training_runtime  # noqa: F401`` and
``pytestmark = pytest.mark.usefixtures("training_runtime")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from make_finetune_fixture import example_inputs, target_function

from onnxsparse.errors import OnnxSparseError
from onnxsparse.model_io import Model, load_model
from onnxsparse.pipeline import PassContext, get_pass

REPO_ROOT = Path(__file__).resolve().parent.parent
FINETUNE_FIXTURE = REPO_ROOT / "fixtures" / "finetune_mlp.onnx"

__all__ = ["FINETUNE_FIXTURE", "example_inputs", "target_function"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def training_runtime() -> Any:
    """The ORT training runtime (installed on first use). Fails instead of skipping in CI."""
    from onnxsparse import training

    rt = training.find_runtime()
    if rt is not None:
        return rt
    try:
        return training.install_runtime()
    except OnnxSparseError as e:
        if _in_ci():
            pytest.fail(f"CI must run the fine-tune tests but the training runtime could not be installed: {e}")
        pytest.skip(f"ONNX Runtime training unavailable and could not be installed: {e}")


def prune_masks(model: Model, pattern: str = "2:4") -> tuple[Model, dict[str, np.ndarray]]:
    """Prune a copy of ``model`` with the prune pass; returns (pruned model, masks)."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    pruned = Model(proto=proto, base_dir=model.base_dir, source=model.source)
    ctx = PassContext()
    result = get_pass("prune")(pattern=pattern).run(pruned, ctx)
    return result.model, dict(ctx.artifacts["masks"])


def write_data(path: Path, n: int = 4096, seed: int = 3, labels: bool = False) -> Path:
    """Training inputs for the fine-tune fixture (the distribution it was trained on)."""
    x = example_inputs(n, seed)
    arrays = {"x": x}
    if labels:
        arrays["y"] = target_function(x)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def outputs(model: Model | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    m = model if isinstance(model, Model) else load_model(model)
    sess = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
