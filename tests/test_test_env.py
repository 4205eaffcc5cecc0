"""The suite leaves the user's home alone: onnxsparse's cache points at a project-local (or chosen) folder."""

from __future__ import annotations

from pathlib import Path

from onnxsparse.finetune.runtime import cache_dir


def test_cache_is_not_the_users() -> None:
    assert cache_dir() != Path.home() / ".cache" / "onnxsparse"
