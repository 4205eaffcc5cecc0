"""Shared pytest fixtures and helpers: fixture-model paths, random feeds, running a model in ONNX Runtime.

Helpers are plain functions (importable as ``from conftest import run_ort, make_feeds`` because pytest puts
``tests/`` on ``sys.path``) and are also offered as fixtures of the same name, so a test can take them as
arguments without an import.

* ``fixture_path(name) -> Path`` — a committed model in ``fixtures/`` (``"cnn"`` or ``"cnn.onnx"``).
* ``make_feeds(model, dims=None, seed=0, cond=True) -> dict`` — seeded random inputs; symbolic dims come from
  ``dims`` (default ``DEFAULT_DIMS``), bool inputs (the If condition) are ``cond``.
* ``run_ort(model, feeds, optimize=False) -> list[np.ndarray]`` — outputs in graph order, CPU provider.
* fixture ``layer_walks`` — the graphs ``find_layers`` walks during the test (counts layer-index builds).
* fixtures ``mlp_gemm_path``, ``transformer_path``, ``cnn_path``, ``if_model_path``, ``loop_model_path``,
  ``qdq_model_path``; ``fixture_model`` (parametrized over all of them); ``real_models`` (the ddddocr models).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from onnxsparse.ir.model_io import Model, ort_session

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "fixtures"
REAL_MODELS_DIR = REPO_ROOT / "real_models" / "ddddocr"
#: committed fixture models (file stems), in the order of fixtures/README.md
FIXTURE_NAMES = ("mlp_gemm", "transformer_block", "cnn", "if_model", "loop_model", "qdq_model")
#: models extracted from the ddddocr wheel by tools/fetch_real_models.py
DDDDOCR_NAMES = ("common", "common_old", "common_det")
#: values for the symbolic dims used by the fixtures and the ddddocr models
DEFAULT_DIMS: dict[str, int] = {"batch": 2, "seq": 8, "image_width": 128}

ModelLike = str | os.PathLike[str] | onnx.ModelProto | Model


def pytest_configure(config: pytest.Config) -> None:
    """Tests leave the user's home alone: onnxsparse's cache (the training runtime) is project-local
    (``.cache/onnxsparse``, git-ignored, kept between runs) unless ``ONNXSPARSE_CACHE`` is set already.
    Subprocesses of the tests inherit it."""
    os.environ.setdefault("ONNXSPARSE_CACHE", str(REPO_ROOT / ".cache" / "onnxsparse"))


def _ort_max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (probed with a one-node model)."""
    import onnxruntime as ort

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 7, -1):
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # any refusal means "not this IR version"
            continue
        return ir
    return 8


def _clamp_default_ir_version() -> None:
    """Models the tests build with ``onnx.helper.make_model`` get onnx's newest IR version by default. On
    Python 3.10 the newest onnxruntime is 1.23 (IR <= 11) while onnx 1.23 writes IR 14, so those test models
    would not load at all there (.ci/run's second run: the declared minimums on Python 3.10). Clamp the
    *default* to what the installed onnxruntime loads; an explicit ``ir_version=`` is kept. onnxsparse itself
    never writes a newer IR than its input had, so this only concerns models built by the tests."""
    max_ir = _ort_max_ir_version()
    if max_ir >= onnx.IR_VERSION:
        return
    original = onnx.helper.make_model

    def make_model(graph: onnx.GraphProto, **kwargs: Any) -> onnx.ModelProto:
        kwargs.setdefault("ir_version", max_ir)
        return original(graph, **kwargs)

    onnx.helper.make_model = make_model


_clamp_default_ir_version()


def fixture_path(name: str) -> Path:
    """Path of a committed fixture model; fails the test clearly if it is missing."""
    path = FIXTURES_DIR / (name if name.endswith(".onnx") else f"{name}.onnx")
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing: run `python tools/make_fixtures.py`")
    return path


def _proto(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, Model):
        return model.proto
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=False)


def make_feeds(
    model: ModelLike, dims: Mapping[str, int] | None = None, seed: int = 0, cond: bool = True
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input that is not an initializer.

    Symbolic dims take their value from ``dims`` (falling back to ``DEFAULT_DIMS``); an unknown symbolic dim
    is an error rather than a guess. Floats are standard normal, ints are in [0, 4), bools are ``cond``.
    """
    proto = _proto(model)
    values = {**DEFAULT_DIMS, **(dims or {})}
    inits = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.dim_param in values:
                shape.append(values[d.dim_param])
            else:
                raise KeyError(f"input '{vi.name}' has symbolic dim '{d.dim_param}': pass dims={{...}}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = np.full(shape, cond, dtype=np.bool_)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(model: ModelLike, feeds: Mapping[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Run ``model`` (path, ModelProto or onnxsparse ``Model``) on the CPU provider; outputs in graph order.

    Graph optimisations are off by default so that two models are compared as written (ORT's fusions differ
    between a Gemm and its Conv rewrite); ``optimize=True`` turns them all on. A ``Model`` runs through
    ``ir.model_io.ort_session``: its external (and edited, spilled) weights go to ORT as memory maps and no
    file is written. Saving it into a temporary folder instead handed the caller's spill store a data file
    that was deleted with the folder (``SpillStore.settle_pack``), so the model could not be read afterwards.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ddddocr's declared output shapes are wrong; keep ORT's warnings out of logs
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    providers = ["CPUExecutionProvider"]
    if isinstance(model, Model):
        sess = ort_session(model, opts, providers)
    elif isinstance(model, onnx.ModelProto):
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    else:
        sess = ort.InferenceSession(os.fspath(model), opts, providers=providers)
    return list(sess.run(None, dict(feeds)))


def copy_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of a ModelProto (passes edit in place; tests keep the original to compare with)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(name="run_ort")
def _run_ort_fixture() -> Any:
    """``run_ort`` as a fixture."""
    return run_ort


@pytest.fixture(name="make_feeds")
def _make_feeds_fixture() -> Any:
    """``make_feeds`` as a fixture."""
    return make_feeds


@pytest.fixture
def layer_walks(monkeypatch: pytest.MonkeyPatch) -> list[onnx.GraphProto]:
    """The main graph of every ``find_layers`` walk made from now on in this process (one entry per build of
    a layer index, or per direct ``find_layers`` call). The walk itself is wrapped (``layers._walk``, looked up
    at each call), so a module that imported ``find_layers`` by name is counted too."""
    from onnxsparse.ir import layers

    walks: list[onnx.GraphProto] = []
    original = layers._walk

    def counting(graph: onnx.GraphProto, path: str, key: str, outer: list[Any], *rest: Any) -> None:
        if not outer:  # the top-level call; the recursion into subgraphs passes their enclosing scopes
            walks.append(graph)
        original(graph, path, key, outer, *rest)

    monkeypatch.setattr(layers, "_walk", counting)
    return walks


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES_DIR


@pytest.fixture
def mlp_gemm_path() -> Path:
    """MLP of Gemms; inputs x[batch,32], aux[8,16]."""
    return fixture_path("mlp_gemm")


@pytest.fixture
def transformer_path() -> Path:
    """Encoder block; input x[batch,seq,64]."""
    return fixture_path("transformer_block")


@pytest.fixture
def cnn_path() -> Path:
    """Small CNN; input x[batch,3,32,32]."""
    return fixture_path("cnn")


@pytest.fixture
def if_model_path() -> Path:
    """If with MatMuls in both branches; inputs x[batch,32], cond (bool scalar)."""
    return fixture_path("if_model")


@pytest.fixture
def loop_model_path() -> Path:
    """Loop whose body has a MatMul; input x[batch,32]."""
    return fixture_path("loop_model")


@pytest.fixture
def qdq_model_path() -> Path:
    """Q/DQ model (opset 19); input x[batch,16,8,8]."""
    return fixture_path("qdq_model")


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_model(request: pytest.FixtureRequest) -> Path:
    """Each committed fixture model in turn (the test runs once per model, id = its name)."""
    return fixture_path(request.param)


@pytest.fixture(scope="session")
def real_models() -> Iterator[dict[str, Path]]:
    """The ddddocr models by stem (``common``, ``common_old``, ``common_det``).

    Skips when ``tools/fetch_real_models.py`` has not been run — except in CI (``CI=true``), which runs the
    fetcher first, so a missing model there is a failure, not a silent skip.
    """
    paths = {name: REAL_MODELS_DIR / f"{name}.onnx" for name in DDDDOCR_NAMES}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        reason = (
            f"ddddocr models missing from {REAL_MODELS_DIR} ({', '.join(missing)}): "
            "run `python tools/fetch_real_models.py`"
        )
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    yield paths
