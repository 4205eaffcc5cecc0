"""onnxsparse: get trained ONNX models ready for 2:4 structured-sparse inference on NVIDIA GPUs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
