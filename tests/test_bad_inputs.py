"""Bad inputs, table-driven, through the CLI (click's runner and a real subprocess).

Every case must end with exactly one clear line on stderr (``error: ...``, no traceback), exit code 1, no
output file (nor a temporary one) written, and every input file byte-identical (hashed before and after).

Non-constant weights are *not* an error (decided here, documented in the README): a weight computed at run
time or fed as a graph input cannot be pruned, so ``prune`` skips that layer with the reason, ``check`` lists
it as ineligible with the reason, and exit stays 0; a user who requires such layers covered states it with
``check --min-coverage`` (exit 2 when unmet). ``test_non_constant_weights_are_reported_not_failed`` checks it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxsparse.cli import main

OPSET = 17


def _mlp(path: Path, w: np.ndarray | None = None, opset: int = OPSET, external: bool = False) -> Path:
    """x[b, 16] @ W[16, 8]: the smallest model every command accepts."""
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32) if w is None else w
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [onnx.numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _weights(value: float) -> np.ndarray:
    w = np.ones((16, 8), np.float32)
    w[5, 3] = value
    return w


def _save(path: Path, graph: onnx.GraphProto) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


# Each builder writes its inputs into `src` and returns the CLI arguments; "{out}" stands for the output path.
Builder = Callable[[Path], list[str]]


def not_onnx(src: Path) -> list[str]:
    (src / "m.onnx").write_text("this is a text file, not a model\n")
    return ["run", str(src / "m.onnx"), "-o", "{out}"]


def empty_file(src: Path) -> list[str]:
    (src / "m.onnx").write_bytes(b"")
    return ["run", str(src / "m.onnx"), "-o", "{out}"]


def truncated(src: Path) -> list[str]:
    data = _mlp(src / "full.onnx").read_bytes()
    (src / "full.onnx").unlink()
    (src / "m.onnx").write_bytes(data[: len(data) // 2])
    return ["run", str(src / "m.onnx"), "-o", "{out}"]


def missing_external_data(src: Path) -> list[str]:
    _mlp(src / "m.onnx", external=True)
    (src / "m.onnx.data").unlink()
    return ["run", str(src / "m.onnx"), "-o", "{out}"]


def truncated_external_data(src: Path) -> list[str]:
    _mlp(src / "m.onnx", external=True)
    data = src / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    return ["check", str(src / "m.onnx")]


def opset_too_old(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx", opset=6)), "-o", "{out}"]


def opset_too_new(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx", opset=99)), "-o", "{out}"]


def nan_weight_prune(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx", w=_weights(np.nan))), "-p", "prune", "-o", "{out}"]


def inf_weight_check(src: Path) -> list[str]:
    return ["check", str(_mlp(src / "m.onnx", w=_weights(-np.inf)))]


def duplicate_output_names(src: Path) -> list[str]:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return ["run", str(_save(src / "m.onnx", graph)), "-o", "{out}"]


def duplicate_initializer_names(src: Path) -> list[str]:
    model = onnx.load(str(_mlp(src / "m.onnx")))
    model.graph.initializer.append(model.graph.initializer[0])
    onnx.save(model, str(src / "m.onnx"))
    return ["run", str(src / "m.onnx"), "-o", "{out}"]


def empty_graph(src: Path) -> list[str]:
    return ["run", str(_save(src / "m.onnx", helper.make_graph([], "g", [], []))), "-o", "{out}"]


def _calib(src: Path, **arrays: np.ndarray) -> list[str]:
    np.savez(src / "calib.npz", **arrays)  # type: ignore[arg-type]
    return ["run", str(_mlp(src / "m.onnx")), "-p", "prune,qdq", "--calib", str(src / "calib.npz"), "-o", "{out}"]


def calib_wrong_name(src: Path) -> list[str]:
    return _calib(src, z=np.zeros((4, 16), np.float32))


def calib_wrong_shape(src: Path) -> list[str]:
    return _calib(src, x=np.zeros((4, 15), np.float32))


def calib_wrong_dtype(src: Path) -> list[str]:
    return _calib(src, x=np.zeros((4, 16), np.int64))


def calib_missing(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx")), "-p", "prune,qdq", "--calib", str(src / "nope.npz"), "-o", "{out}"]


def output_is_input(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx")), "-o", str(src / "m.onnx")]


def output_overwrites_input_data(src: Path) -> list[str]:
    _mlp(src / "m.onnx", external=True)
    (src / "x.onnx.data").write_bytes((src / "m.onnx.data").read_bytes())
    proto = onnx.load(str(src / "m.onnx"), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "x.onnx.data"  # the input reads x.onnx.data, which `-o x.onnx` would write
    onnx.save(proto, str(src / "m.onnx"))
    (src / "m.onnx.data").unlink()
    return ["run", str(src / "m.onnx"), "-o", str(src / "x.onnx")]


def output_folder_missing(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx")), "-o", "{out_dir}/missing/out.onnx"]


def output_folder_is_a_file(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx")), "-o", str(src / "m.onnx") + "/out.onnx"]


def output_unwritable(src: Path) -> list[str]:
    # Tests run as root on CI machines, where chmod cannot make a folder unwritable; /proc is, for anyone.
    return ["run", str(_mlp(src / "m.onnx")), "-o", "/proc/onnxsparse-test-out.onnx"]


def model_missing(src: Path) -> list[str]:
    return ["run", str(src / "nope.onnx"), "-o", "{out}"]


def unknown_pass(src: Path) -> list[str]:
    return ["run", str(_mlp(src / "m.onnx")), "-p", "prune,sparsify", "-o", "{out}"]


@dataclass(frozen=True)
class Case:
    build: Builder
    message: str  # regex the error line must match


CASES: dict[str, Case] = {
    "not_onnx": Case(not_onnx, r"is not an ONNX model"),
    "empty_file": Case(empty_file, r"is not an ONNX model"),
    "truncated": Case(truncated, r"is not an ONNX model"),
    "missing_external_data": Case(missing_external_data, r"missing external data file 'm\.onnx\.data' for tensor 'W'"),
    "truncated_external_data": Case(truncated_external_data, r"truncated.*'W'|'W'.*truncated"),
    "opset_too_old": Case(opset_too_old, r"unsupported opset 6"),
    "opset_too_new": Case(opset_too_new, r"unsupported opset 99"),
    "nan_weight_prune": Case(nan_weight_prune, r"weight 'W' has 1 NaN/Inf value"),
    "inf_weight_check": Case(inf_weight_check, r"weight 'W' has 1 NaN/Inf value"),
    "duplicate_output_names": Case(duplicate_output_names, r"single static assignment.*'y'"),
    "duplicate_initializer_names": Case(duplicate_initializer_names, r"W initializer name is not unique"),
    "empty_graph": Case(empty_graph, r"not an ONNX model \(no graph"),
    "calib_wrong_name": Case(calib_wrong_name, r"has 'z', which is not a model input"),
    "calib_wrong_shape": Case(calib_wrong_shape, r"input 'x' has shape \[4, 15\], dim 1 must be 16"),
    "calib_wrong_dtype": Case(calib_wrong_dtype, r"input 'x' is int64, the model takes float32"),
    "calib_missing": Case(calib_missing, r"calibration data .*nope\.npz does not exist"),
    "output_is_input": Case(output_is_input, r"is the input model"),
    "output_overwrites_input_data": Case(
        output_overwrites_input_data, r"would write x\.onnx\.data, which is the external-data file of the input"
    ),
    "output_folder_missing": Case(output_folder_missing, r"folder .*missing does not exist"),
    "output_folder_is_a_file": Case(output_folder_is_a_file, r"folder .*m\.onnx is not a folder"),
    "output_unwritable": Case(output_unwritable, r"cannot write to output folder /proc"),
    "model_missing": Case(model_missing, r"no such file: .*nope\.onnx"),
    "unknown_pass": Case(unknown_pass, r"unknown pass 'sparsify'"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _invoke(args: list[str], mode: str) -> tuple[int, str, str]:
    if mode == "runner":
        res = CliRunner().invoke(main, args)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception  # a crash: show its traceback
        return res.exit_code, res.stdout, res.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "onnxsparse", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("mode", ["runner", "subprocess"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, mode: str, tmp_path: Path) -> None:
    case = CASES[name]
    src, out_dir = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out_dir.mkdir()
    out = out_dir / "result.onnx"
    args = [a.replace("{out_dir}", str(out_dir)).replace("{out}", str(out)) for a in case.build(src)]
    before = _snapshot(src)
    code, stdout, stderr = _invoke(args, mode)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, (code, stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr + stdout
    assert re.search(case.message, lines[0]), lines[0]
    assert not stdout.strip(), stdout
    assert _snapshot(src) == before  # input byte-identical, nothing added next to it
    assert not list(out_dir.iterdir())  # no output, no temporary left behind
    assert not Path("/proc/onnxsparse-test-out.onnx").exists()


def test_non_constant_weights_are_reported_not_failed(tmp_path: Path) -> None:
    """A weight that is a graph input, and one computed at run time: skipped with the reason, exit 0; the
    coverage gate is how a user insists (exit 2)."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W0")
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["h"], name="from_input"),
        helper.make_node("Neg", ["W0"], ["W_neg"]),
        helper.make_node("MatMul", ["x", "W_neg"], ["g"], name="computed"),
        helper.make_node("Add", ["h", "g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16]),
            helper.make_tensor_value_info("W_in", TensorProto.FLOAT, [16, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [w],
    )
    src = _save(tmp_path / "m.onnx", graph)
    before = _snapshot(tmp_path)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    res = CliRunner().invoke(main, ["run", str(src), "-p", "prune", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "weight 'W_in' is a graph input" in res.output
    assert "computed at run time by Neg" in res.output
    assert out.exists()
    res = CliRunner().invoke(main, ["check", str(src)])
    assert res.exit_code == 0 and "ineligible" in res.output and "computed at run time" in res.output
    res = CliRunner().invoke(main, ["check", str(src), "--min-coverage", "0.5"])
    assert res.exit_code == 2 and "coverage" in res.stderr
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("out")} == before
