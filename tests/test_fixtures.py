"""The fixture models and the real-model fetcher: determinism, validity, coverage, and that they run.

Other tests lean on these models to exercise the passes, so a fixture that silently lost a case (a Gemm
without transB=1, an If without weights) would make their tests weaker without failing; the coverage tests
here pin each case the README promises.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from conftest import FIXTURE_NAMES, FIXTURES_DIR, REPO_ROOT, fixture_path, make_feeds, run_ort

from onnxsparse.ir.layers import attr, find_layers
from onnxsparse.ir.model_io import load_model


def _load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_fixtures() -> ModuleType:
    return _load_tool("make_fixtures")


@pytest.fixture(scope="module")
def fetcher() -> ModuleType:
    return _load_tool("fetch_real_models")


# ------------------------------------------------------------------------------------------- determinism


def test_regenerated_fixtures_are_byte_identical(make_fixtures: ModuleType, tmp_path: Path) -> None:
    written = make_fixtures.build_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.onnx" for n in FIXTURE_NAMES)
    # (other tools add their own models to fixtures/, so only ours are compared)
    for path in written:
        assert path.read_bytes() == (FIXTURES_DIR / path.name).read_bytes(), (
            f"{path.name} differs from the committed file: rerun tools/make_fixtures.py and commit"
        )


def test_make_fixtures_cli_writes_into_out(make_fixtures: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    assert make_fixtures.main(["--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(f"{n}.onnx" for n in FIXTURE_NAMES)
    assert not list(out.glob(".*")), "temporary files left behind"


# ------------------------------------------------------------------------------------ validity and running


def test_fixture_is_small_and_passes_full_checker(fixture_model: Path) -> None:
    assert fixture_model.stat().st_size < 1_000_000
    onnx.checker.check_model(onnx.load(str(fixture_model)), full_check=True)
    model = load_model(fixture_model)  # onnxsparse's own loader accepts it too
    assert model.opset in (17, 19)


def _dims_of(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("dims", [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 5, "seq": 33}])
def test_fixture_runs_in_ort_with_declared_output_shapes(fixture_model: Path, dims: dict[str, int]) -> None:
    proto = onnx.load(str(fixture_model))
    for optimize in (False, True):
        outs = run_ort(fixture_model, make_feeds(proto, dims), optimize=optimize)
        for vi, out in zip(proto.graph.output, outs, strict=True):
            expected = [dims[d] if isinstance(d, str) else d for d in _dims_of(vi)]
            assert list(out.shape) == expected, vi.name
            assert np.isfinite(out).all(), vi.name
            # a dead (all-zero / constant) output would make every equivalence test built on it vacuous
            assert out.std() > 0.05, vi.name


def test_fixture_batch_rows_are_independent(fixture_model: Path) -> None:
    """Each batch row of a batched run equals the run of that row alone: the dynamic batch dim is real."""
    proto = onnx.load(str(fixture_model))
    feeds = make_feeds(proto, {"batch": 3, "seq": 6}, seed=1)
    batched_inputs = {vi.name for vi in proto.graph.input if "batch" in _dims_of(vi)}
    batched_outputs = ["batch" in _dims_of(vi) for vi in proto.graph.output]
    full = run_ort(fixture_model, feeds)
    for row in range(3):
        single = {k: v[row : row + 1] if k in batched_inputs else v for k, v in feeds.items()}
        outs = run_ort(fixture_model, single)
        for is_batched, f, s in zip(batched_outputs, full, outs, strict=True):
            np.testing.assert_allclose(f[row : row + 1] if is_batched else f, s, rtol=1e-4, atol=1e-5)


def test_transformer_sequence_positions_interact() -> None:
    """Attention mixes positions: changing one token changes the others' outputs (not a per-token MLP)."""
    path = fixture_path("transformer_block")
    feeds = make_feeds(path, {"batch": 1, "seq": 5})
    base = run_ort(path, feeds)[0]
    feeds["x"] = feeds["x"].copy()
    feeds["x"][0, 4] += 1.0
    changed = run_ort(path, feeds)[0]
    assert np.abs(changed[0, :4] - base[0, :4]).max() > 1e-3


def test_if_model_branches_compute_different_things() -> None:
    path = fixture_path("if_model")
    then_out = run_ort(path, make_feeds(path, cond=True))[0]
    else_out = run_ort(path, make_feeds(path, cond=False))[0]
    assert then_out.shape == else_out.shape
    assert np.abs(then_out - else_out).max() > 0.1


# --------------------------------------------------------------------------------------------- coverage


def _layers(name: str) -> dict[str, object]:
    return {layer.name: layer for layer in find_layers(onnx.load(str(fixture_path(name))))}


def _init_shape(proto: onnx.ModelProto, name: str) -> list[int]:
    return next(list(t.dims) for t in proto.graph.initializer if t.name == name)


def test_mlp_gemm_covers_gemm_attribute_cases() -> None:
    proto = onnx.load(str(fixture_path("mlp_gemm")))
    gemms = {n.name: n for n in proto.graph.node if n.op_type == "Gemm"}
    assert {attr(n, "transB", 0) for n in gemms.values()} == {0, 1}
    assert any(attr(n, "transA", 0) == 1 for n in gemms.values())
    assert any(attr(n, "alpha", 1.0) != 1.0 and attr(n, "beta", 1.0) != 1.0 for n in gemms.values())
    bias_shapes = {
        tuple(_init_shape(proto, n.input[2])) if len(n.input) > 2 and n.input[2] else None for n in gemms.values()
    }
    assert None in bias_shapes
    assert any(s is not None and len(s) == 1 for s in bias_shapes)  # [N]
    assert any(s is not None and len(s) == 2 and s[0] == 1 for s in bias_shapes)  # [1, N]
    assert any(s is not None and len(s) == 2 and s[0] > 1 for s in bias_shapes)  # [M, N]
    reasons = [str(layer.reason or "") for layer in find_layers(proto)]
    assert any("shared" in r for r in reasons)
    assert any("computed at run time" in r for r in reasons)
    eligible = [layer for layer in find_layers(proto) if layer.check_pattern(4) is None]
    assert len(eligible) >= 4
    input_dims = {vi.name: _dims_of(vi) for vi in proto.graph.input}
    assert input_dims["x"][0] == "batch"


def test_transformer_covers_rank3_matmuls_and_attention() -> None:
    proto = onnx.load(str(fixture_path("transformer_block")))
    ops = [n.op_type for n in proto.graph.node]
    for op in ("Softmax", "LayerNormalization", "Erf"):
        assert op in ops
    layers = find_layers(proto)
    constant = [layer for layer in layers if layer.reason is None]
    runtime = [layer for layer in layers if layer.reason and "run time" in str(layer.reason)]
    assert len(constant) == 6 and len(runtime) == 2  # q/k/v/out/fc1/fc2; QK^T and PV
    assert {layer.weight_shape for layer in constant} == {(64, 64), (64, 256), (256, 64)}
    assert _dims_of(proto.graph.input[0]) == ["batch", "seq", 64]


def test_cnn_covers_conv_flavours() -> None:
    layers = _layers("cnn")
    groups = {name: layer.group for name, layer in layers.items()}  # type: ignore[attr-defined]
    assert groups["dw"] == 16 and groups["grouped"] == 4
    assert layers["up"].op_type == "ConvTranspose"  # type: ignore[attr-defined]
    assert str(layers["stem"].check_pattern(4)) == "C_in/group=3 is not divisible by 4"  # type: ignore[attr-defined]
    assert layers["dw"].check_pattern(4) is not None  # type: ignore[attr-defined]
    assert layers["grouped"].check_pattern(4) is None  # type: ignore[attr-defined]
    ops = [n.op_type for n in onnx.load(str(fixture_path("cnn"))).graph.node]
    assert {"BatchNormalization", "GlobalAveragePool", "Gemm", "Add"} <= set(ops)


def test_if_and_loop_models_hold_weights_in_subgraphs() -> None:
    if_layers = find_layers(onnx.load(str(fixture_path("if_model"))))
    in_branches = [layer for layer in if_layers if "branch" in layer.graph_path]
    assert {layer.graph_path.rsplit(".", 1)[1] for layer in in_branches} == {"then_branch", "else_branch"}
    outer_scope = [layer for layer in in_branches if layer.source is not None and layer.source.graph is not layer.graph]
    assert len(outer_scope) == 1  # the then-branch MatMul reading a main-graph initializer
    assert all(layer.reason is None for layer in in_branches)
    loop_layers = find_layers(onnx.load(str(fixture_path("loop_model"))))
    assert any(layer.graph_path.endswith("loop.body") and layer.reason is None for layer in loop_layers)


def test_qdq_model_covers_weight_chains() -> None:
    proto = onnx.load(str(fixture_path("qdq_model")))
    assert proto.opset_import[0].version == 19
    layers = {layer.name: layer for layer in find_layers(proto)}
    chains = {name: [n.op_type for n in layer.chain] for name, layer in layers.items()}
    assert chains["conv1"] == ["DequantizeLinear"]
    assert chains["conv2"] == ["Transpose", "DequantizeLinear"]
    assert attr(layers["conv2"].chain[0], "perm") == [3, 2, 0, 1]
    assert chains["fc2"] == ["Transpose", "DequantizeLinear"]
    assert chains["fc3"] == ["Cast"] and layers["fc3"].source is not None
    assert layers["fc3"].source.tensor.data_type == onnx.TensorProto.FLOAT16
    assert chains["fc4"] == ["Reshape", "DequantizeLinear"] and layers["fc4"].reason is None
    assert layers["fc5"].reason is not None  # reduction axis lost in the flat Reshape
    # the stored [kh, kw, Cin, Cout] tensor: reduction (Cin) is axis 2, output channel axis 3
    assert (layers["conv2"].source_reduction_axis, layers["conv2"].source_channel_axis) == (2, 3)
    int8_weights = [
        layer
        for layer in layers.values()
        if layer.source is not None and layer.source.tensor.data_type == onnx.TensorProto.INT8
    ]
    assert len(int8_weights) == 6
    # activations: per-tensor int8 with zero point 0 on every weighted op's input
    quant = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quant) == len(layers)
    zero_points = {n.input[2] for n in quant}
    for name in zero_points:
        t = next(t for t in proto.graph.initializer if t.name == name)
        assert t.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(t).any()


# ----------------------------------------------------------------------------------------- real models


def test_ddddocr_models_load_and_run(real_models: dict[str, Path]) -> None:
    start = time.perf_counter()
    for name, path in real_models.items():
        model = load_model(path)
        widths = [96, 200] if name != "common_det" else [None]
        for width in widths:
            dims = {"image_width": width} if width else {}
            outs = run_ort(path, make_feeds(model, dims))
            assert outs and all(np.isfinite(o).all() for o in outs), name
    assert time.perf_counter() - start < 60


def test_ddddocr_models_have_expected_layers(real_models: dict[str, Path]) -> None:
    counts = {name: len(find_layers(load_model(path).proto)) for name, path in real_models.items()}
    assert counts == {"common": 22, "common_old": 0, "common_det": 83}  # common_old uses ConvInteger


# -------------------------------------------------------------------------------------------- fetcher


def _fake_wheel(path: Path, models: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ddddocr/__init__.py", "")
        zf.writestr("ddddocr/charsets.py", "CHARSET_BETA = ['', 'a']\n")
        for name, data in models.items():
            zf.writestr(f"ddddocr/{name}", data)
    return path


def test_fetcher_extracts_onnx_members_and_is_idempotent(fetcher: ModuleType, tmp_path: Path) -> None:
    payload = fixture_path("loop_model").read_bytes()
    wheel = _fake_wheel(tmp_path / "ddddocr-0-py3-none-any.whl", {n: payload for n in fetcher.EXPECTED})
    out = tmp_path / "out"
    paths = fetcher.fetch(out, wheel=wheel)
    assert sorted(p.name for p in paths) == sorted(fetcher.EXPECTED)
    assert all(p.read_bytes() == payload for p in paths)
    assert not list(out.glob(".*")), "temporary files left behind"
    mtimes = [p.stat().st_mtime_ns for p in paths]
    # second run: nothing to do, even with a wheel that would fail
    assert fetcher.fetch(out, wheel=tmp_path / "missing.whl") == [out / n for n in fetcher.EXPECTED]
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert fetcher.main(["--only", "ddddocr", "--out", str(out)]) == 0  # verifies each through load_model


@pytest.mark.parametrize("case", ["not_zip", "no_models", "missing"])
def test_fetcher_fails_with_one_line(
    fetcher: ModuleType, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = tmp_path / "ddddocr-0-py3-none-any.whl"
    if case == "not_zip":
        wheel.write_bytes(b"not a zip")
    elif case == "no_models":
        _fake_wheel(wheel, {})
    rc = fetcher.main(["--out", str(tmp_path / "out"), "--wheel", str(wheel)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_fetcher_rejects_a_model_that_does_not_load(
    fetcher: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl", {n: b"garbage" for n in fetcher.EXPECTED})
    rc = fetcher.main(["--out", str(tmp_path / "out"), "--wheel", str(wheel)])
    err = capsys.readouterr().err
    assert rc == 1 and "does not load" in err and err.count("\n") == 1


def test_fetcher_reports_pip_failure(fetcher: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing ``pip download`` becomes a FetchError naming the spec and pip's last line."""

    class Proc:  # stands in for subprocess.CompletedProcess of a failed pip run (a mock: no network in tests)
        returncode = 1
        stdout = ""
        stderr = "Looking in indexes...\nERROR: No matching distribution found for ddddocr==0\n"

    monkeypatch.setattr(fetcher.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(fetcher.FetchError, match=r"ddddocr==0 failed: ERROR: No matching distribution"):
        fetcher.download_wheel("0", tmp_path)
