"""Calibrated one-shot n:m pruning: solvers on arrays, input statistics, and the runner that feeds them.

Public API (stable; ``sensitivity`` and ``compare`` build on it):

- ``collect_stats(model, layers, data, mask_input=None, progress=False) -> dict[str, GramStats]``: one ONNX
  Runtime pass over ``data`` (anything ``calibration_data.open_calibration`` accepts: .npz, folder, dicts,
  readers) for all ``layers`` (``find_layers`` entries) of the model as it is; keyed by layer node name.
- ``prune_layer(model, layer, stats, method, n, m, *, block_size=128, damp=0.01, prefer=None,
  bias_correction=False, refit_iters=0) -> LayerOutcome``: prune that layer's stored weight in place
  (magnitude / wanda / sparsegpt), optionally correct its bias and re-fit the kept weights; the outcome says
  what changed (relative output error from H, non-zeros, mask) and ``outcome.undo()`` restores the tensors.
- ``GramStats``: H = XᵀX, Σx and row counts in float64; mergeable with ``+``.
- ``solvers``: ``magnitude``, ``wanda``, ``sparsegpt``, ``refit``, ``bias_delta`` on plain arrays.
- ``prune_calibrated(...)`` (``runner``): the ``prune`` pass's staged (sequential) driver.

Module map: ``solvers`` (numpy only, no graph), ``gram`` (statistics), ``layout`` (stored tensor ↔ solver
matrix, im2col), ``collect`` (the ORT stage runner), ``apply`` (one layer), ``runner`` (stages).
"""

from onnxsparse.calibration.gram import GramStats
from onnxsparse.pruning.apply import METHODS, LayerOutcome, prune_layer
from onnxsparse.pruning.collect import collect_stats

__all__ = ["METHODS", "GramStats", "LayerOutcome", "collect_stats", "prune_layer"]
