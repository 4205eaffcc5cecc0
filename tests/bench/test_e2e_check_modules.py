"""tools/bench_e2e_check.py's model surgery on CPU (skipped without torch): the GEMM modules that replace Linear
and 1×1 convs compute what the modules they replace compute, and ONNX node names map to the right modules.
The cuSPARSELt plan is replaced by a labelled stand-in with the plan's interface (m, set_stream, run)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
e2e = pytest.importorskip("bench_e2e_check")


class StandInPlan:
    """NOT cuSPARSELt: computes act(x·Wᵀ + b) with torch into ``y``, for a plan of ``m`` rows."""

    def __init__(self, w, b, act, m):
        self.w, self.b, self.act, self.m = w, b, act, m

    def set_stream(self, stream):
        pass

    def run(self, x, y):
        assert x.shape[0] == self.m and x.is_contiguous()
        out = x @ self.w.t() + (self.b if self.b is not None else 0)
        y.copy_(out.relu() if self.act == "relu" else out)


def test_linear_and_padded_sparse_gemm_match_nn_linear(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"cuda_stream": 0})())
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    dense = e2e.Linear2d(e2e.DenseGemm(lin.weight, lin.bias, None), 32)
    torch.testing.assert_close(dense(x), ref)
    sparse = e2e.Linear2d(e2e.SparseGemm(StandInPlan(lin.weight, lin.bias, None, m=16), 32), 32)  # 15 rows → 16
    torch.testing.assert_close(sparse(x), ref)
    gelu = e2e.Linear2d(e2e.DenseGemm(lin.weight, lin.bias, "gelu"), 32)
    torch.testing.assert_close(gelu(x), F.gelu(ref), atol=2e-3, rtol=1e-3)  # CPU: exact Gelu


def test_conv1x1_over_nhwc_matches_conv2d():
    conv = nn.Conv2d(32, 48, 1)
    x = torch.randn(2, 32, 7, 7).contiguous(memory_format=torch.channels_last)
    ref = F.relu(conv(x))
    mod = e2e.Conv1x1(e2e.DenseGemm(conv.weight.reshape(48, -1), conv.bias, "relu"), 48)
    y = mod(x)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_fold_bn_matches_conv_then_bn():
    conv, bn = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(e2e.fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_onnx_names_map_to_modules():
    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(4, 4)

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = Self()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Att()

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Layer(), Layer()])

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Enc()

    model = Bert()
    assert (
        e2e.onnx_to_module("/model/encoder/layer.1/attention/self/query/MatMul", model)
        == "encoder.layer.1.attention.self.query"
    )
    res = nn.Module()
    res.layer1 = nn.Sequential(nn.Module())
    res.layer1[0].conv1 = nn.Conv2d(2, 2, 1)
    res.layer1[0].downsample = nn.Conv2d(2, 2, 1)
    assert e2e.onnx_to_module("/layer1/layer1.0/conv1/Conv", res) == "layer1.0.conv1"
    assert e2e.onnx_to_module("/layer1/layer1.0/downsample/Conv", res) == "layer1.0.downsample"
    assert e2e.onnx_to_module("/nothing/here/Conv", res) is None
