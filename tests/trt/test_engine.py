"""onnxsparse.trt.builder: sizes, profiles, precision plans, trtexec commands and scripts, log parsing, and the
TensorRT API calls.

The API-call tests run against ``tests/fake_tensorrt`` — a MOCK of the ``tensorrt`` module, injected into
``sys.modules``. They check which calls onnxsparse makes (flags, profiles, pool limit, timing cache, the file
handed to the parser, version branching); they do not and cannot show that an engine builds: no engine is
built anywhere in these tests (the mock returns placeholder bytes).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fake_tensorrt import MOCK_ENGINE_BYTES, make
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxsparse.commands.build import float16_copy
from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.pipeline import Pipeline
from onnxsparse.trt.builder import (
    IN_MEMORY,
    BuildOptions,
    Profile,
    TensorRTMissing,
    build_engine,
    import_tensorrt,
    make_plan,
    parse_size,
    parse_sparsity_log,
    resolve_profiles,
    trt_major,
    trtexec_command,
    trtexec_script,
    trtexec_steps,
    two_four_layers,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def mlp(batch: int | str = "batch", opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"], name="fc"), h.make_node("Relu", ["a"], ["y"], name="act")]
    graph = h.make_graph(
        nodes,
        "mlp",
        [h.make_tensor_value_info("x", T.FLOAT, [batch, 16])],
        [h.make_tensor_value_info("y", T.FLOAT, [batch, 8])],
        [nh.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def saved(tmp_path: Path, proto: onnx.ModelProto, name: str = "m.onnx") -> Model:
    save_model(Model(proto=proto), tmp_path / name)
    return load_model(tmp_path / name)


# ---------------------------------------------------------------------------------------------- sizes, shapes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4G", 4 * 2**30),
        ("512M", 512 * 2**20),
        ("1.5G", 1536 * 2**20),
        ("2048", 2048 * 2**20),
        ("64K", 64 * 1024),
        ("1GiB", 2**30),
        ("2gb", 2 * 2**30),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "4X", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(OnnxSparseError):
        parse_size(text)


def test_profiles_fill_missing_shapes_from_opt() -> None:
    p = resolve_profiles(mlp(), opt_shapes={"x": (8, 16)})
    assert p == {"x": Profile((8, 16), (8, 16), (8, 16))}
    p = resolve_profiles(mlp(), min_shapes={"x": (1, 16)}, max_shapes={"x": (32, 16)})
    assert p == {"x": Profile((1, 16), (32, 16), (32, 16))}
    p = resolve_profiles(mlp(), shapes={"x": (4, 16)})
    assert p == {"x": Profile((4, 16), (4, 16), (4, 16))}
    assert resolve_profiles(mlp(batch=2)) == {}  # static inputs need no profile
    assert resolve_profiles(mlp(batch=2), shapes={"x": (2, 16)}) == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "dynamic dims"),
        ({"opt_shapes": {"y": (1, 8)}}, "not a model input"),
        ({"opt_shapes": {"x": (1, 16, 1)}}, "rank 3"),
        ({"opt_shapes": {"x": (1, 15)}}, "fixed to 16"),
        ({"min_shapes": {"x": (8, 16)}, "opt_shapes": {"x": (4, 16)}}, "min <= opt <= max"),
        ({"shapes": {"x": (1, 16)}, "max_shapes": {"x": (4, 16)}}, "both --shapes"),
    ],
)
def test_profiles_reject_bad_shapes(kwargs: dict, message: str) -> None:
    with pytest.raises(OnnxSparseError, match=message):
        resolve_profiles(mlp(), **kwargs)


# ---------------------------------------------------------------------------------------------- plans


def test_plans_per_version_and_precision() -> None:
    fp32 = mlp()
    qdq = onnx.load(str(FIXTURES / "qdq_model.onnx"))
    assert make_plan(fp32, "fp16", 10).flags == ["FP16", "SPARSE_WEIGHTS"]
    assert make_plan(fp32, "fp32", 10).flags == ["SPARSE_WEIGHTS"]
    assert make_plan(qdq, "int8", 10).flags == ["INT8", "SPARSE_WEIGHTS"]
    assert make_plan(qdq, "best", 10).flags == ["FP16", "INT8", "SPARSE_WEIGHTS"]
    assert any("builds as fp16" in n for n in make_plan(fp32, "best", 10).notes)
    assert any("Q/DQ nodes" in n for n in make_plan(qdq, "fp16", 10).notes)
    assert not make_plan(fp32, "fp16", 10).notes
    for precision, model in (("fp16", fp32), ("best", qdq), ("int8", qdq), ("fp32", fp32)):
        plan = make_plan(model, precision, 11)
        assert plan.flags == ["SPARSE_WEIGHTS"] and plan.strongly_typed
        assert plan.to_fp16 == (precision in ("fp16", "best"))
    assert not make_plan(fp32, "fp16", 10).strongly_typed and not make_plan(fp32, "fp16", 10).to_fp16
    with pytest.raises(OnnxSparseError, match="Q/DQ"):
        make_plan(fp32, "int8", 10)
    with pytest.raises(OnnxSparseError, match="Q/DQ"):
        make_plan(fp32, "int8", 11)
    with pytest.raises(OnnxSparseError, match="not supported"):
        make_plan(fp32, "fp16", 8)


def test_plan_notes_qdq_below_opset19_on_trt11() -> None:
    qdq13 = onnx.load(str(FIXTURES / "qdq_model.onnx"))
    for o in qdq13.opset_import:
        if o.domain == "":
            o.version = 13
    assert any("opset 13" in n for n in make_plan(qdq13, "best", 11).notes)
    assert not any("opset" in n for n in make_plan(onnx.load(str(FIXTURES / "qdq_model.onnx")), "best", 11).notes)


# ---------------------------------------------------------------------------------------------- trtexec


def _cmd(precision: str = "fp16", major: int = 10, model: onnx.ModelProto | None = None, **opts: object) -> list[str]:
    plan = make_plan(model if model is not None else mlp(), precision, major)
    return trtexec_command("m.onnx", "m.engine", plan, BuildOptions(precision=precision, **opts))  # type: ignore[arg-type]


def test_trtexec_precision_flags() -> None:
    qdq = onnx.load(str(FIXTURES / "qdq_model.onnx"))
    base = ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--sparsity=enable"]
    assert _cmd("fp16") == [*base, "--fp16"]
    assert _cmd("int8", model=qdq) == [*base, "--int8"]
    assert _cmd("best", model=qdq) == [*base, "--best"]
    assert _cmd("fp32") == base
    for precision in ("fp16", "fp32"):
        assert _cmd(precision, 11) == [*base, "--stronglyTyped"]  # no precision flags exist in 11
    assert _cmd("int8", 11, model=qdq) == [*base, "--stronglyTyped"]


def test_trtexec_shapes_workspace_and_cache() -> None:
    two = onnx.load(str(FIXTURES / "mlp_gemm.onnx"))  # inputs x[batch,32] and aux[8,16] (static)
    profiles = resolve_profiles(two, min_shapes={"x": (1, 32)}, opt_shapes={"x": (8, 32)}, max_shapes={"x": (64, 32)})
    cmd = _cmd(model=two, profiles=profiles)
    assert cmd[-3:] == ["--minShapes=x:1x32", "--optShapes=x:8x32", "--maxShapes=x:64x32"]
    transformer = onnx.load(str(FIXTURES / "transformer_block.onnx"))  # x[batch,seq,64]
    profiles = resolve_profiles(transformer, shapes={"x": (2, 128, 64)})
    assert _cmd(model=transformer, profiles=profiles)[-3:] == [
        "--minShapes=x:2x128x64",
        "--optShapes=x:2x128x64",
        "--maxShapes=x:2x128x64",
    ]
    assert _cmd(workspace=parse_size("4G"))[-1] == "--memPoolSize=workspace:4096M"
    assert _cmd(workspace=parse_size("1000K"))[-1] == "--memPoolSize=workspace:1M"  # rounded up, never 0
    assert _cmd(timing_cache=Path("/c/t.cache"))[-1] == "--timingCacheFile=/c/t.cache"


def test_trtexec_trt11_fp16_first_makes_the_fp16_model() -> None:
    plan = make_plan(mlp(), "fp16", 11)
    steps = trtexec_steps(Path("/m/in.onnx"), Path("/e/out.engine"), plan, BuildOptions())
    assert steps[0] == ["onnxsparse", "run", "/m/in.onnx", "-p", "to-fp16", "-o", "/e/out.fp16.onnx"]
    assert steps[1][:2] == ["trtexec", "--onnx=/e/out.fp16.onnx"]
    plan10 = make_plan(mlp(), "fp16", 10)
    assert len(trtexec_steps(Path("/m/in.onnx"), Path("/e/out.engine"), plan10, BuildOptions())) == 1


def _fake_trtexec(bin_dir: Path, argv_file: Path) -> None:
    """A MOCK ``trtexec`` executable: records its arguments and prints TensorRT-style log lines."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "trtexec"
    script.write_text(
        "#!/usr/bin/env bash\n"
        "# MOCK trtexec for tests: not TensorRT\n"
        f"printf '%s\\n' \"$@\" > {shlex.quote(str(argv_file))}\n"
        "echo '[11/25/2026-18:00:00] [I] [TRT] (Sparsity) Found 1 layer(s) eligible to use sparse tactics: fc'\n"
        "echo '[11/25/2026-18:00:00] [I] [TRT] (Sparsity) Chose 0 layer(s) using sparse tactics: '\n"
    )
    script.chmod(0o755)


@pytest.mark.parametrize("major", [10, 11])
def test_trtexec_script_runs_with_mock_trtexec(tmp_path: Path, major: int) -> None:
    """The script is valid bash, passes every argument intact (paths with spaces) and keeps the log."""
    folder = tmp_path / "a dir"
    folder.mkdir()
    model_path = folder / "in put.onnx"
    save_model(Model(proto=mlp()), model_path)
    engine = folder / "out.engine"
    options = BuildOptions(
        profiles=resolve_profiles(mlp(), shapes={"x": (4, 16)}), workspace=2**30, timing_cache=folder / "t.cache"
    )
    plan = make_plan(mlp(), "fp16", major)
    script = tmp_path / "build.sh"
    script.write_text(trtexec_script(model_path, engine, plan, options))
    script.chmod(0o755)
    argv = tmp_path / "argv.txt"
    _fake_trtexec(tmp_path / "bin", argv)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    res = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert argv.read_text().splitlines() == trtexec_steps(model_path, engine, plan, options)[-1][1:]
    assert "(Sparsity) Found 1 layer(s)" in res.stdout
    assert "Found 1 layer(s)" in (folder / "out.engine.build.log").read_text()
    if major == 11:  # the first step really ran onnxsparse's to-fp16 on the model
        fp16 = onnx.load(str(folder / "out.fp16.onnx"))
        assert fp16.graph.initializer[0].data_type == T.FLOAT16
        assert fp16.graph.input[0].type.tensor_type.elem_type == T.FLOAT  # I/O kept float32


# ---------------------------------------------------------------------------------------------- log parsing

TRT10_LOG = """\
[11/25/2026-18:01:02] [I] [TRT] Local timing cache in use. Profiling results in this builder pass will not be stored.
[11/25/2026-18:01:09] [I] [TRT] (Sparsity) Found 4 layer(s) eligible to use sparse tactics: conv1 + Relu_1, conv2, \
/blocks.0/mlp/fc1/MatMul, fc
[11/25/2026-18:01:09] [I] [TRT] (Sparsity) Chose 2 layer(s) using sparse tactics: conv1 + Relu_1, \
/blocks.0/mlp/fc1/MatMul
[11/25/2026-18:01:10] [I] [TRT] Engine generation completed in 8.1 seconds.
"""

TRT8_LOG = """\
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, Gemm_725
[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:
"""


def test_parse_trt10_log() -> None:
    r = parse_sparsity_log(TRT10_LOG.splitlines())
    assert (r.eligible, r.chosen) == (4, 2)
    assert r.eligible_layers == ["conv1 + Relu_1", "conv2", "/blocks.0/mlp/fc1/MatMul", "fc"]
    assert r.chosen_layers == ["conv1 + Relu_1", "/blocks.0/mlp/fc1/MatMul"]
    assert r.dense_layers == ["conv2", "fc"]
    assert parse_sparsity_log([TRT10_LOG]).to_dict() == r.to_dict()  # one multi-line string works too


def test_parse_trt8_log_and_empty_lists() -> None:
    r = parse_sparsity_log(TRT8_LOG.splitlines())
    assert (r.eligible, r.chosen) == (3, 0)
    assert r.eligible_layers == ["Conv_22", "MatMul_51", "Gemm_725"] and r.chosen_layers == []
    empty = parse_sparsity_log(["(Sparsity) Found 0 layer(s) eligible to use sparse tactics: "])
    assert empty.seen and empty.eligible == 0 and empty.eligible_layers == []


def test_parse_log_without_sparsity_lines_and_repeats() -> None:
    assert not parse_sparsity_log(["[I] [TRT] building", "nothing here"]).seen
    r = parse_sparsity_log(
        [
            "(Sparsity) Chose 1 layer(s) using sparse tactics: a",
            "(Sparsity) Chose 2 layer(s) using sparse tactics: a, b",
        ]
    )
    assert r.chosen == 2 and r.chosen_layers == ["a", "b"] and r.eligible is None


# ---------------------------------------------------------------------------------------------- API (MOCK)


def test_import_tensorrt_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTMissing, match="cannot be imported"):
        import_tensorrt()


def test_version_detection_with_mock() -> None:
    assert trt_major(make("10.8.0.43")) == 10
    assert trt_major(make("11.4.1")) == 11
    unversioned = make("11.0.0")
    unversioned.__version__ = "unknown"  # type: ignore[attr-defined]
    assert trt_major(unversioned) == 11  # no FP16 flag → 11
    unversioned10 = make("10.0.0")
    unversioned10.__version__ = ""  # type: ignore[attr-defined]
    assert trt_major(unversioned10) == 10


def test_mock_trt10_build_sets_flags_profile_pool_and_cache(tmp_path: Path) -> None:
    """MOCK TensorRT 10: checks the calls made, not an engine (the mock returns placeholder bytes)."""
    trt = make("10.8.0.43")
    m = saved(tmp_path, mlp())
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"old-cache")
    options = BuildOptions(
        precision="fp16",
        profiles=resolve_profiles(
            m.proto, min_shapes={"x": (1, 16)}, opt_shapes={"x": (8, 16)}, max_shapes={"x": (32, 16)}
        ),
        workspace=parse_size("2G"),
        timing_cache=cache,
    )
    engine = tmp_path / "m.engine"
    result = build_engine(m, engine, options, trt)
    s = trt.state  # type: ignore[attr-defined]
    assert s["network_flags"] == 0
    assert s["flags"] == {"FP16", "SPARSE_WEIGHTS"}
    assert s["pool_limits"] == {"WORKSPACE": 2 * 2**30}
    assert s["profiles"] == [{"x": ((1, 16), (8, 16), (32, 16))}]
    assert s["timing_cache_in"] == b"old-cache" and s["timing_cache_ignore_mismatch"] is False
    assert cache.read_bytes() == b"MOCK-TIMING-CACHE:1"  # written back after the build
    assert s["parsed_path"] == str(m.source)  # TRT 10 parses the model file itself
    assert engine.read_bytes() == MOCK_ENGINE_BYTES  # the mock's placeholder, written atomically
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.engine")]
    assert (result.sparsity.eligible, result.sparsity.chosen) == (3, 2)
    assert result.sparsity.dense_layers == ["fc"]
    assert result.warnings == ["MOCK builder: no engine was built"]
    assert result.to_dict()["builder_flags"] == ["FP16", "SPARSE_WEIGHTS"]


def test_mock_trt10_int8_on_qdq_model(tmp_path: Path) -> None:
    trt = make("10.3.0")
    m = load_model(FIXTURES / "qdq_model.onnx")
    options = BuildOptions(precision="int8", profiles=resolve_profiles(m.proto, shapes={"x": (1, 16, 8, 8)}))
    build_engine(m, tmp_path / "q.engine", options, trt)
    assert trt.state["flags"] == {"INT8", "SPARSE_WEIGHTS"}  # type: ignore[attr-defined]
    assert trt.state["pool_limits"] == {}  # type: ignore[attr-defined]  # no workspace asked: none set


def test_mock_trt11_fp16_parses_a_float16_copy(tmp_path: Path) -> None:
    """MOCK TensorRT 11: no FP16 flag exists; the parser must get a float16 model, which is cleaned up."""
    trt = make("11.4.1")
    assert not hasattr(trt.BuilderFlag, "FP16")  # type: ignore[attr-defined]
    m = saved(tmp_path, mlp(batch=4))
    # the builder converts nothing (the core imports no pass): the build command hands it a float16 copy
    with pytest.raises(OnnxSparseError, match="needs a float16 model; run the to-fp16 pass") as err:
        build_engine(m, tmp_path / "m.engine", BuildOptions(precision="fp16"), trt)
    assert "\n" not in str(err.value) and trt.state["parsed_path"] is None  # type: ignore[attr-defined]
    half = float16_copy(m)
    result = build_engine(half, tmp_path / "m.engine", BuildOptions(precision="fp16"), trt)
    s = trt.state  # type: ignore[attr-defined]
    assert s["flags"] == {"SPARSE_WEIGHTS"}
    assert s["parsed_path"] != str(m.source) and s["parsed_file_exists_during_parse"]
    assert s["parsed_elem_types"]["w"] == T.FLOAT16 and s["parsed_elem_types"]["x"] == T.FLOAT
    assert not Path(s["parsed_path"]).exists()  # the temporary float16 copy is gone
    assert result.plan.to_fp16 and result.onnx_parsed == IN_MEMORY
    assert half.source is None  # the temporary file was written from a copy: the caller's model is as it was
    assert s["profiles"] == []  # static input: no profile
    # the input model was not touched
    assert onnx.load(str(m.source)).graph.initializer[0].data_type == T.FLOAT


def test_mock_trt11_int8_parses_the_qdq_model_as_is(tmp_path: Path) -> None:
    trt = make("11.0.0")
    m = load_model(FIXTURES / "qdq_model.onnx")
    options = BuildOptions(precision="int8", profiles=resolve_profiles(m.proto, shapes={"x": (2, 16, 8, 8)}))
    build_engine(m, tmp_path / "q.engine", options, trt)
    assert trt.state["parsed_path"] == str(m.source)  # type: ignore[attr-defined]
    assert trt.state["flags"] == {"SPARSE_WEIGHTS"}  # type: ignore[attr-defined]


def test_mock_parser_errors_and_failed_builds_write_nothing(tmp_path: Path) -> None:
    m = saved(tmp_path, mlp(batch=2))
    engine = tmp_path / "m.engine"
    with pytest.raises(OnnxSparseError, match=r"parser rejected the model.*Unsupported op"):
        build_engine(m, engine, BuildOptions(), make(parse_errors=["Unsupported op FooBar", "second"]))
    with pytest.raises(OnnxSparseError, match="did not build an engine: MOCK failure"):
        build_engine(m, engine, BuildOptions(), make(build_fails=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_mock_dynamic_network_input_without_profile_is_refused(tmp_path: Path) -> None:
    m = saved(tmp_path, mlp())
    with pytest.raises(OnnxSparseError, match="dynamic dims"):
        build_engine(m, tmp_path / "m.engine", BuildOptions(), make())


def test_two_four_layers_counts_pruned_weights(tmp_path: Path) -> None:
    m = load_model(FIXTURES / "cnn.onnx")
    assert two_four_layers(m) == []
    res = Pipeline("prune").run(m)
    pruned = two_four_layers(res.model)
    assert pruned and all(isinstance(n, str) for n in pruned)


def test_engine_file_permissions_follow_umask(tmp_path: Path) -> None:
    m = saved(tmp_path, mlp(batch=2))
    old = os.umask(0o022)
    try:
        build_engine(m, tmp_path / "m.engine", BuildOptions(), make())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.engine").stat().st_mode) == 0o644  # not mkstemp's 0600, not executable


def test_two_four_layers_walks_each_model_state_once(layer_walks: list[onnx.GraphProto]) -> None:
    """The build report's 2:4 count reads the model's layer index: asking twice, or after a prune (which uses
    the same index and writes values only), walks the graph once per state; the pipeline's final cleanup makes
    a new state, walked once more."""
    m = load_model(FIXTURES / "cnn.onnx")
    assert two_four_layers(m) == [] and two_four_layers(m) == []
    assert len(layer_walks) == 1 and m.layer_cache.builds == 1
    res = Pipeline("prune").run(m)
    assert len(layer_walks) == 1  # prune answered from the same index
    pruned = two_four_layers(res.model)
    assert pruned and two_four_layers(res.model) == pruned
    assert len(layer_walks) == 2
