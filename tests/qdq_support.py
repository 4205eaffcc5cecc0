"""Shared builders and checks of the ``qdq`` pass's tests (tests/passes/test_qdq*.py): a zoo of one of each
weighted op, calibration batches, a pipeline run, cosine similarity, a name-keyed view of a result graph, and
the check that two saved results hold the same weights and compute the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from builders import parse_checked
from conftest import copy_proto, make_feeds, run_ort
from onnx import TensorProto
from onnx import numpy_helper as nh

from onnxsparse.ir.model_io import Model
from onnxsparse.passes.qdq import QdqPass
from onnxsparse.pipeline import PassContext, Pipeline, PipelineResult

F = TensorProto.FLOAT


def rand_init(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def op_zoo(opset: int = 17, dtype: int = F) -> onnx.ModelProto:
    """One of each weighted op: Conv (+bias), ConvTranspose, Gemm transB=0, Gemm transB=1 (+bias), MatMul."""
    rng = np.random.default_rng(0)
    inits = [
        rand_init(rng, "conv.w", 16, 8, 3, 3),
        rand_init(rng, "conv.b", 16),
        rand_init(rng, "deconv.w", 16, 8, 2, 2),
        rand_init(rng, "gemm0.w", 8, 12),
        rand_init(rng, "gemm1.w", 20, 12),
        rand_init(rng, "gemm1.b", 20),
        rand_init(rng, "mm.w", 20, 6),
    ]
    if dtype != F:
        for t in inits:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    ty = "float" if dtype == F else "float16"
    text = f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        zoo ({ty}[N,8,8,8] x) => ({ty}[N,6] y) {{
            [conv] c = Conv <pads = [1, 1, 1, 1]> (x, "conv.w", "conv.b")
            ["conv.relu"] "c.relu" = Relu (c)
            [deconv] d = ConvTranspose <strides = [2, 2]> ("c.relu", "deconv.w")
            [pool] p = GlobalAveragePool (d)
            [flat] f = Flatten (p)
            [gemm0] g0 = Gemm (f, "gemm0.w")
            [gemm1] g1 = Gemm <transB = 1> (g0, "gemm1.w", "gemm1.b")
            [mm] y = MatMul (g1, "mm.w")
        }}
    """
    return parse_checked(text, *inits)


EXPECTED_AXIS = {"conv": 0, "deconv": 1, "gemm0": 1, "gemm1": 0, "mm": 1}


def calib_batches(model: onnx.ModelProto | Model, n: int = 6, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [make_feeds(model, dims={"N": 4}, seed=seed + i) for i in range(n)]


def run_qdq(model: onnx.ModelProto | Model, calib: object = None, **options: object) -> PipelineResult:
    m = model if isinstance(model, Model) else Model(proto=copy_proto(model))
    ctx = PassContext(calibration=calib if calib is not None else calib_batches(m))
    return Pipeline([QdqPass(**options)]).run(m, ctx)  # the pipeline ends with the full checker


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class QGraph:
    """A result graph by names: producers, initializers, nodes."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.g = proto.graph
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.inits = {t.name: t for t in self.g.initializer}
        self.nodes = {n.name: n for n in self.g.node}

    def array(self, name: str) -> np.ndarray:
        return nh.to_array(self.inits[name])


def two_upgrades_model() -> onnx.ModelProto:
    """opset 11, a float32 Conv (per-axis Q/DQ: opset 13) and a MatMul of two float16 activations (found float16
    by calibration: opset 19): before the plan was keyed by names, qdq planned three times here."""
    rng = np.random.default_rng(3)
    text = """
        <ir_version: 8, opset_import: ["" : 11]>
        g (float[N,4,6,6] x, float16[N,4,8] a, float16[N,8,5] b) => (float[N,8,6,6] y, float16[N,4,5] z) {
            [conv] y = Conv <pads = [1, 1, 1, 1]> (x, w)
            [bmm] z = MatMul (a, b)
        }
    """
    return parse_checked(text, rand_init(rng, "w", 8, 4, 3, 3))


def assert_same_saved(got: Path, want: Path, feeds: dict[str, np.ndarray]) -> None:
    """Two saved models hold the same initializers (names and values, external data read) and ORT gives the
    same first output for ``feeds``."""
    saved = {t.name: nh.to_array(t) for t in onnx.load(str(got)).graph.initializer}
    expected = {t.name: nh.to_array(t) for t in onnx.load(str(want)).graph.initializer}
    assert saved.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)
    np.testing.assert_array_equal(run_ort(got, feeds)[0], run_ort(want, feeds)[0])
