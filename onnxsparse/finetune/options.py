"""The hyper-parameters of one fine-tune (``FinetuneOptions``) and what it reports back (``FinetuneResult``).

The CLI (``onnxsparse finetune``), the ``finetune`` pass and the Python API share these names; each validates
here, so a bad value is one line before any work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from onnxsparse.errors import OnnxSparseError

if TYPE_CHECKING:  # model_io imports onnx; the pass registry imports this module at CLI start-up
    from onnxsparse.ir.model_io import Model

LOSSES = ("distill", "mse", "ce")
#: what ``train=`` may name: the masked (pruned) weights, the biases of those layers, normalisation scales and
#: shifts, and embedding tables (float initializers read by ``Gather`` as its data)
TRAIN_SETS = ("weights", "biases", "norms", "embeddings")
#: the default trainable sets; measured on the trained MiniLM-L3 (2:4 magnitude, 300 steps, batch 16): see
#: /work/coord/readme_HD.md and README "Fine-tuning" — training norms and embeddings as well recovers most
DEFAULT_TRAIN = ("weights", "biases", "norms", "embeddings")


def parse_train(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"weights,biases"`` or a sequence of set names → a tuple in ``TRAIN_SETS`` order (one-line error)."""
    items = [x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip()]
    unknown = [x for x in items if x not in TRAIN_SETS]
    if unknown:
        raise OnnxSparseError(f"unknown trainable set '{unknown[0]}' (choose from {', '.join(TRAIN_SETS)})")
    if not items:
        raise OnnxSparseError(f"train needs at least one of {', '.join(TRAIN_SETS)}")
    return tuple(s for s in TRAIN_SETS if s in items)


@dataclass(frozen=True)
class FinetuneOptions:
    """Hyper-parameters of one fine-tune (the CLI, the pass and the API share these names)."""

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    batch_size: int = 32
    loss: str = "distill"
    labels: str | None = None
    outputs: tuple[str, ...] = ()
    #: trainable sets (``TRAIN_SETS``); a comma-separated string is accepted
    train: tuple[str, ...] = DEFAULT_TRAIN
    weight_decay: float = 0.0
    warmup: int = 0
    lr_schedule: str = "cosine"
    seed: int = 0
    #: model input whose non-zero entries mark real positions (attention mask): losses average over them only,
    #: and batches are trimmed to their longest row where the model's sequence axis is dynamic
    mask_input: str | None = None
    #: batches of similar lengths (needs ``mask_input``): fewer padded positions per step, seeded order
    bucket_by_length: bool = False
    #: evaluate on the eval data every this many steps (0: only at the start and the end, when eval data is given)
    eval_every: int = 0
    #: intra-op threads for training and the teacher (0: ONNX Runtime's default, one per core)
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", parse_train(self.train))
        if self.loss not in LOSSES:
            raise OnnxSparseError(f"unknown loss '{self.loss}' (choose from {', '.join(LOSSES)})")
        if self.loss in ("mse", "ce") and not self.labels:
            raise OnnxSparseError(f"loss '{self.loss}' needs labels: give the data key that holds them (--labels KEY)")
        if self.steps is not None and self.epochs is not None:
            raise OnnxSparseError("give either steps or epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise OnnxSparseError("steps must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise OnnxSparseError("epochs must be positive")
        if self.batch_size < 1:
            raise OnnxSparseError("batch size must be at least 1")
        if not self.lr > 0:
            raise OnnxSparseError("learning rate must be positive")
        if self.lr_schedule not in ("cosine", "constant"):
            raise OnnxSparseError("lr schedule must be 'cosine' or 'constant'")
        if self.warmup < 0 or self.eval_every < 0 or self.threads < 0:
            raise OnnxSparseError("warmup, eval-every and threads must not be negative")
        if self.bucket_by_length and not self.mask_input:
            raise OnnxSparseError("bucket-by-length needs mask-input NAME: lengths are counted from that input")


@dataclass
class FinetuneResult:
    """The fine-tuned model and what happened on the way."""

    model: Model
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    trained: list[str]
    runtime: str
    changed: list[str] = field(default_factory=list)
    #: parameters the runtime could not train (no gradient kernel on the way), with the reason
    frozen: dict[str, str] = field(default_factory=dict)
    #: largest change training made to any masked-out entry before folding (0: they got no update)
    outside_mask_drift: float = 0.0
    losses: list[float] = field(default_factory=list)
    #: trainable set → the parameters in it (what ``train=`` selected, before any were frozen)
    train_sets: dict[str, list[str]] = field(default_factory=dict)
    #: eval points: {"step", "loss", "cosine"} on the eval data (empty without eval data)
    curve: list[dict[str, float]] = field(default_factory=list)
    #: how batches were shaped: trimming on/off and why, tokens fed vs the untrimmed count, bucketing
    batching: dict[str, Any] = field(default_factory=dict)
    #: seconds of the training loop (``loop``, ``loop_cpu``: CPU time of the worker process) and its parts:
    #: ``batches``, ``teacher`` (forward), ``forward_backward`` (the training step), ``optimizer``, ``eval``
    timing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["model"]
        d["losses"] = [round(x, 8) for x in self.losses]
        return d
