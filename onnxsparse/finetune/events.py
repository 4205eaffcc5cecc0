"""The worker's side of a fine-tune as the caller sees it: its JSON event stream, and progress from those events.

``events_subprocess`` runs ``training_worker`` in a subprocess (the isolated ORT training runtime first on its
``sys.path``) and yields its events; a failure becomes one ``OnnxSparseError`` line. ``Events`` turns them
into progress through ``onnxsparse.progress`` (a bar on a TTY, a plain line at least every 30 s in a log),
the loss list, the eval curve and the final summary.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import worker as training_worker
from onnxsparse.finetune.runtime import Runtime

log = logging.getLogger("onnxsparse.finetune.run")


def events_subprocess(job_path: Path, runtime: Runtime, cwd: Path) -> Iterator[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-c",
        training_worker.BOOTSTRAP,
        str(runtime.path or ""),
        training_worker.__file__,
        str(job_path),
    ]
    stderr_path = cwd / "worker.stderr"
    with (
        open(stderr_path, "w") as err,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd) as proc,
    ):
        assert proc.stdout is not None
        error = None
        try:
            for line in proc.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if event.get("event") == "error":
                    error = event.get("message")
                    continue
                yield event
        finally:
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
    if rc != 0 or error:
        if not error:
            lines = [ln for ln in stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
            error = lines[-1] if lines else f"exit code {rc}"
        short = error if len(error) <= 400 else error[:200] + " … " + error[-200:]
        raise OnnxSparseError(f"fine-tune failed in ORT training: {short}")


class Events:
    """The worker's events → progress (``onnxsparse.progress``: a bar on a TTY, a line at least every 30 s
    elsewhere, with loss, lr, samples or tokens per second), the loss list, the eval curve and the summary."""

    def __init__(
        self,
        show: bool,
        on_step: Callable[[int, float], None] | None,
        frozen: dict[str, str],
        progress_options: Mapping[str, Any] | None = None,
    ) -> None:
        import time

        self.show = show
        self.on_step = on_step
        self.frozen = frozen
        self.losses: list[float] = []
        self.curve: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {}
        self.bar: Any = None
        #: passed to ``Progress`` (``stream``, ``tty``, ``clock``, ``every_s``: tests drive them)
        self.progress_options = dict(progress_options or {})
        self._clock = self.progress_options.get("clock", time.monotonic)
        self._last: dict[str, Any] = {}
        self._samples = 0
        self._tokens = 0
        self._clock_start = 0.0

    def _postfix(self) -> dict[str, Any]:
        seconds = max(self._clock() - self._clock_start, 1e-9)
        post: dict[str, Any] = {"loss": self._last.get("loss"), "lr": self._last.get("lr")}
        if self._tokens:
            post["tokens/s"] = round(self._tokens / seconds)
        else:
            post["samples/s"] = round(self._samples / seconds, 1)
        if self.curve:
            post.update({f"eval_{k}": v for k, v in self.curve[-1].items() if k != "step"})
        return post

    def __call__(self, event: dict[str, Any]) -> None:
        from onnxsparse.progress import Progress

        kind = event.get("event")
        if kind == "start":
            self._clock_start = self._clock()
            self.bar = Progress(
                event["steps"],
                desc="fine-tune",
                unit="step",
                enabled=self.show,
                postfix=self._postfix,
                **self.progress_options,
            )
        elif kind == "step":
            loss = float(event["loss"])
            self.losses.append(loss)
            self._last = event
            self._samples += int(event.get("samples") or 0)
            self._tokens += int(event.get("tokens") or 0)
            if self.bar is not None:
                self.bar.update(1)
            if self.on_step is not None:
                self.on_step(int(event["step"]), loss)
        elif kind == "eval":
            point = {k: v for k, v in event.items() if k != "event"}
            self.curve.append(point)
            log.info(
                "fine-tune eval at step %d: %s",
                point["step"],
                ", ".join(f"{k} {v:.6g}" for k, v in point.items() if k != "step"),
            )
        elif kind == "frozen":
            self.frozen.update(event["params"])
            for name, reason in event["params"].items():
                log.warning("fine-tune: kept %s fixed: %s", name, reason)
        elif kind == "done":
            self.summary.update(event)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
