"""Named pipelines, in a module of their own so the CLI can show them in ``--help`` without importing onnx."""

from __future__ import annotations

#: What ``onnxsparse run`` does without ``-p``: prune to 2:4, then report (and gate on) sparsity.
DEFAULT_PIPELINE = "prune,validate"

#: Named pipelines (``onnxsparse run --preset NAME``). ``progressive`` is the seed's recipe: zero 25 % (3:4),
#: fine-tune with that mask, then 50 % (2:4) chosen among the survivors, fine-tune again, gate on the result.
PRESETS: dict[str, str] = {
    "default": DEFAULT_PIPELINE,
    "progressive": "prune{pattern=3:4},finetune,prune{pattern=2:4},finetune,validate{require-all=true}",
    "trt8": "gemm-to-conv,prune,validate",
    "int8": "prune,validate,qdq",
    "fp16": "prune,validate,to-fp16",
}
