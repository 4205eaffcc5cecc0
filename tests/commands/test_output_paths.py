"""Issue 12, items 1-3 and 5: no output may be an input, an input's external data, another output or the
output model's own data file, and a bad output location fails before anything is written.

Every case runs through the CLI (click's runner, in-process) on a model with external data, and checks that
every file in the folder is byte-identical afterwards and that no file was added. The property test draws
``-o``/``--json``/``masks=``/``--calib``/``--trtexec-script`` from a small pool of colliding and fresh
paths and checks the all-or-nothing rule for each combination. ``build`` runs against the MOCK TensorRT of
tests/fake_tensorrt (it builds nothing) so that a valid combination exits 0.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import fixture_path
from fake_tensorrt import make
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnxsparse.cli import main


def _setup(folder: Path) -> None:
    """m.onnx (the cnn fixture, weights in m.onnx.data) and calibration data c.npz in ``folder``."""
    m = onnx.load(str(fixture_path("cnn")))
    onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    np.savez(folder / "c.npz", x=np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _setup(tmp_path)
    monkeypatch.chdir(tmp_path)  # paths as a user types them, relative
    return tmp_path


def _refused(work: Path, args: list[str], message: str) -> None:
    before = _snapshot(work)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output
    assert ".tmp" not in res.output
    assert _snapshot(work) == before  # inputs byte-identical, nothing new written


def test_item1_output_is_the_inputs_data_file(work: Path) -> None:
    _refused(work, ["run", "m.onnx", "-o", "m.onnx.data"], "-o 'm.onnx.data': is the external-data file of the input")
    _refused(work, ["calibrate", "m.onnx", "--calib", "c.npz", "-o", "m.onnx.data"], "-o 'm.onnx.data'")
    _refused(work, ["build", "m.onnx", "-o", "m.onnx.data"], "-o 'm.onnx.data'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "m.onnx", "-o", "o.onnx", "--json", "m.onnx"], "--json 'm.onnx': is the input model"),
        (["run", "m.onnx", "-o", "o.onnx", "--json", "o.onnx"], "--json 'o.onnx': is also -o o.onnx"),
        (["run", "m.onnx", "-o", "o.onnx", "--json", "o.onnx.data"], "--json 'o.onnx.data': is also the external"),
        (["run", "m.onnx", "-o", "o.onnx", "-p", "prune{masks=m.onnx.data}"], "prune{masks} 'm.onnx.data': is the"),
        (["run", "m.onnx", "-o", "o.onnx", "-p", "prune{masks=o.onnx}"], "prune{masks} 'o.onnx': is also -o"),
        (["run", "m.onnx", "-o", "o.onnx", "--calib", "c.npz", "--json", "c.npz"], "--json 'c.npz': is the input"),
        (["run", "m.onnx", "-o", "c.npz", "--calib", "c.npz", "-p", "prune"], "-o 'c.npz': is the input c.npz"),
        (["run", "m.onnx", "-o", "c.npz", "-p", "prune,finetune{data=c.npz}"], "-o 'c.npz': is the input c.npz"),
        (["run", "m.onnx", "-o", "o.onnx", "-p", "prune{masks=k.npz},finetune{masks=k.npz}"], "prune{masks} 'k.npz'"),
        (["check", "m.onnx", "--json", "m.onnx"], "--json 'm.onnx': is the input model"),
        (["check", "m.onnx", "--json", "m.onnx.data"], "--json 'm.onnx.data': is the external-data file"),
        (["inspect", "m.onnx", "--json", "m.onnx"], "--json 'm.onnx': is the input model"),
        (["calibrate", "m.onnx", "--calib", "c.npz", "-o", "q.onnx", "--json", "c.npz"], "--json 'c.npz'"),
        (["calibrate", "m.onnx", "--calib", "c.npz", "-o", "q.onnx", "--json", "q.onnx.data"], "--json 'q.onnx.data'"),
        (["build", "m.onnx", "-o", "e.plan", "--trtexec-script", "m.onnx"], "--trtexec-script 'm.onnx': is the input"),
        (["build", "m.onnx", "-o", "e.plan", "--trtexec-script", "e.plan"], "--trtexec-script 'e.plan': is also -o"),
        (["build", "m.onnx", "-o", "e.plan", "--json", "m.onnx.data"], "--json 'm.onnx.data'"),
        (["build", "m.onnx", "-o", "e.plan", "--timing-cache", "m.onnx"], "--timing-cache 'm.onnx': is the input"),
        (["build", "e.onnx.data", "-o", "e.onnx"], ""),  # not a model: refused by the loader, nothing written
    ],
)
def test_item2_every_output_differs_from_every_input_and_output(work: Path, args: list[str], message: str) -> None:
    _refused(work, args, message)


def test_item2_links_to_an_input_are_refused(work: Path) -> None:
    (work / "alias.onnx").symlink_to(work / "m.onnx")
    (work / "hard.data").hardlink_to(work / "m.onnx.data")
    _refused(work, ["run", "m.onnx", "-o", "alias.onnx"], "-o 'alias.onnx': is the input model")
    _refused(work, ["run", "m.onnx", "-o", "o.onnx", "--json", "hard.data"], "--json 'hard.data': is the external")


def test_item3_bad_json_folder_fails_before_the_model_is_written(work: Path) -> None:
    _refused(
        work,
        ["run", "m.onnx", "-o", "o.onnx", "--json", "/nonexistent/r.json"],
        "--json '/nonexistent/r.json': its folder /nonexistent does not exist",
    )
    _refused(work, ["run", "m.onnx", "-o", "o.onnx", "-p", "prune{masks=nodir/m.npz}"], "prune{masks} 'nodir/m.npz'")
    _refused(
        work,
        ["calibrate", "m.onnx", "--calib", "c.npz", "-o", "q.onnx", "--json", "nodir/r.json"],
        "--json 'nodir/r.json'",
    )
    _refused(work, ["build", "m.onnx", "-o", "e.plan", "--trtexec-script", "nodir/b.sh"], "--trtexec-script 'nodir")
    _refused(work, ["check", "m.onnx", "--json", "nodir/r.json"], "--json 'nodir/r.json'")


def test_distinct_outputs_succeed_and_inputs_stay(work: Path) -> None:
    before = _snapshot(work)
    res = CliRunner().invoke(main, ["run", "m.onnx", "-o", "o.onnx", "--json", "r.json", "-p", "prune{masks=k.npz}"])
    assert res.exit_code == 0, res.output
    after = _snapshot(work)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"o.onnx", "o.onnx.data", "r.json", "k.npz"}


# ---------------------------------------------------------------------------------------------- property (item 5)

#: the pool every path is drawn from: the input, its data file, the output (and its data file) as the
#: other roles would name them, fresh paths (named .npz so masks= takes them; two roles may draw the same
#: one) and a missing folder
POOL = ("m.onnx", "m.onnx.data", "o.onnx", "o.onnx.data", "f1.npz", "f2.npz", "nodir/f3.npz")


@contextmanager
def _folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="onnxsparse-paths-") as tmp:
        folder = Path(tmp)
        _setup(folder)
        yield folder


def _expect_ok(inputs: list[str], outputs: list[str], model_out: str) -> bool:
    """The rule, stated independently of paths.check_outputs: every written path distinct and placeable."""
    written = [*outputs, model_out + ".data"]  # the output model's data file is reserved whether or not written
    reads = {"m.onnx", "m.onnx.data", *inputs}
    return (
        len(set(written)) == len(written)
        and not (set(written) & reads)
        and not any(p.startswith("nodir/") for p in outputs)
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    command=st.sampled_from(["run", "build"]),
    out=st.sampled_from(POOL),
    extra=st.lists(
        st.tuples(st.sampled_from(["--json", "masks", "--calib", "--trtexec-script"]), st.sampled_from(POOL)),
        max_size=3,
        unique_by=lambda t: t[0],
    ),
)
def test_item5_all_or_nothing(command: str, out: str, extra: list[tuple[str, str]]) -> None:
    roles = dict(extra)
    if command == "run":
        roles.pop("--trtexec-script", None)
        outputs = [out, *(roles[k] for k in ("--json", "masks") if k in roles)]
        inputs = [roles["--calib"]] if "--calib" in roles else []
        model_out = out
    else:
        roles.pop("masks", None)
        roles.pop("--calib", None)
        outputs = [out, *(roles[k] for k in ("--json", "--trtexec-script") if k in roles)]
        if "--trtexec-script" in roles:
            outputs.append(out + ".build.log")  # the script's log, beside the engine
        inputs, model_out = [], "<none>"  # an engine has no data file
    # prune refuses a masks path that does not end in .npz (also exit 1, nothing written)
    expect_ok = _expect_ok(inputs, outputs, model_out) and roles.get("masks", ".npz").endswith(".npz")
    event(f"{command} {'ok' if expect_ok else 'refused'}")
    with _folder() as folder, mock.patch.dict(sys.modules, {"tensorrt": make("10.8.0")}):
        at = {name: str(folder / name) for name in POOL}
        if command == "run":
            prune = f"prune{{masks={at[roles['masks']]}}}" if "masks" in roles else "prune"
            args = ["run", at["m.onnx"], "-o", at[out], "-p", prune]
            args += [a for flag in ("--json", "--calib") if flag in roles for a in (flag, at[roles[flag]])]
        else:
            args = ["build", at["m.onnx"], "-o", at[out], "--shapes", "x:1x3x32x32"]
            args += [a for flag in ("--json", "--trtexec-script") if flag in roles for a in (flag, at[roles[flag]])]
        before = _snapshot(folder)
        res = CliRunner().invoke(main, args)
        after = _snapshot(folder)
    if expect_ok:
        assert res.exit_code == 0, (args, res.output)
        assert {k: v for k, v in after.items() if k in before and k not in outputs} == {
            k: v for k, v in before.items() if k not in outputs
        }
        assert all(p in after for p in outputs if not p.endswith(".build.log")), (args, sorted(after))
        assert all(before[k] == after[k] for k in ("m.onnx", "m.onnx.data", "c.npz"))
    else:
        assert res.exit_code == 1, (args, res.output)
        assert after == before, args
