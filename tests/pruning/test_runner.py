"""pruning.runner bookkeeping: stages find layers by value name (``Layer.key``), not object identity, so layers
found on a copy of the proto are grouped like the model's own. (``collect.stage_session``, now over
``GraphIndex``, is checked against the whole model in ``tests/passes/test_prune_calibrated.py``.)"""

from __future__ import annotations

from conftest import copy_proto, fixture_path

from onnxsparse.ir.index import model_layers
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import load_model
from onnxsparse.pruning.runner import stages


def test_stages_of_layers_found_on_a_copy_equal_the_models_own() -> None:
    model = load_model(fixture_path("transformer_block"))
    own = [lay for lay in model_layers(model) if lay.source is not None]
    copied = [lay for lay in find_layers(copy_proto(model.proto)) if lay.source is not None]
    assert all(a.node is not b.node and a.key == b.key for a, b in zip(own, copied, strict=True))
    want = [[lay.key for lay in group] for group in stages(model, own)]
    assert len(want) == 4 and len(want[0]) == 3  # q/k/v share the first stage
    assert [[lay.key for lay in group] for group in stages(model, copied)] == want
