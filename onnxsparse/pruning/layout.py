"""Where a layer's solver matrix lives in its stored tensor, and how its input activation becomes rows of X.

The solvers see ``w[N_out, K]`` with the n:m groups contiguous along K. ``problems`` gives, for each
independent GEMM of a layer (one per convolution group), an index matrix ``[N_out, K]`` of flat positions in
the *stored* tensor: the weight chain (DequantizeLinear / Transpose / Cast / Reshape / Identity, as
``find_layers`` walked it) is replayed on ``arange(size)``, so reading is ``stored.flat[index]`` and writing
back ``stored.flat[index] = w`` — no per-op inverse mapping to get wrong. The K order per op:

- Gemm transB=1 ``B[N, K]``: as stored; transB=0 ``B[K, N]`` and MatMul ``B[K, N]``: transposed.
- Conv ``W[C_out, C_in/g, *k]``: per group, K ordered (*k, C_in/g), so each group of m runs along C_in for
  one kernel position (the hardware's 2:4 axis; REFERENCE.md "Calibrated pruning"), and X is the im2col patch
  matrix in the same order.
- ConvTranspose ``W[C_in, C_out/g, *k]``: per group, N = C_out/g·∏k columns and K = C_in/g, X the input pixels.

``activation_rows`` turns the layer's input value into those rows (im2col honouring group, strides, pads,
dilations and auto_pad), in chunks of samples so a large feature map never makes one giant patch matrix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxsparse.ir.layers import Layer, attr

#: im2col patch chunks stay below about this many bytes
CHUNK_BYTES = 16 * 2**20


@dataclass
class Problem:
    """One independent GEMM of a layer: flat stored-tensor positions ``index[N_out, K]`` and its output
    channels (``channels[N_out]``: the layer output channel each row feeds, None where rows mix channels)."""

    index: np.ndarray
    group: int
    channels: np.ndarray | None


def _view_index(layer: Layer) -> np.ndarray | str:
    """Flat stored positions arranged as the layer sees its weight (``layer.weight_shape``), or why not."""
    src = layer.source
    assert src is not None and layer.weight_shape is not None
    idx = np.arange(int(np.prod(src.shape, dtype=np.int64)), dtype=np.int64).reshape(src.shape)
    chain = list(reversed(layer.chain))  # stored-tensor side first
    for pos, node in enumerate(chain):
        op = node.op_type
        if op == "Transpose":
            perm = attr(node, "perm")
            idx = idx.transpose(list(perm) if perm is not None else list(range(idx.ndim))[::-1])
        elif op == "Reshape":
            target = _shape_before(chain[pos + 1 :], layer.weight_shape)
            if target is None:
                return "a weight chain with two Reshapes is not supported by calibrated pruning"
            idx = idx.reshape(target)
        elif op not in ("DequantizeLinear", "Cast", "Identity"):
            return f"weight chain op {op} is not supported"
    if tuple(idx.shape) != tuple(layer.weight_shape):
        return f"weight chain gives shape {idx.shape}, expected {layer.weight_shape}"
    return idx


def _shape_before(rest: list, final: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape entering ``rest`` (chain ops, stored side first) given the layer's weight shape at its end."""
    shape = list(final)
    for node in reversed(rest):
        if node.op_type == "Reshape":
            return None
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(range(len(shape)))[::-1]
            before = [0] * len(shape)
            for i, p in enumerate(perm):
                before[int(p)] = shape[i]
            shape = before
    return tuple(shape)


def problems(layer: Layer) -> list[Problem] | str:
    """The layer's solver problems (one per group), or why the calibrated solvers cannot handle it."""
    view = _view_index(layer)
    if isinstance(view, str):
        return view
    op = layer.op_type
    if op == "Gemm":
        mat = view if attr(layer.node, "transB", 0) else view.T
        return [Problem(np.ascontiguousarray(mat), 0, np.arange(mat.shape[0]))]
    if op == "MatMul":
        if view.ndim != 2:
            return f"MatMul weight of rank {view.ndim} (a batch of weights) is not supported by calibrated pruning"
        return [Problem(np.ascontiguousarray(view.T), 0, np.arange(view.shape[1]))]
    g = layer.group
    if op == "Conv":
        c_out = view.shape[0]
        if c_out % g:
            return f"C_out={c_out} is not divisible by group={g}"
        per = c_out // g
        out = []
        for j in range(g):
            rows = view[j * per : (j + 1) * per]
            mat = np.moveaxis(rows, 1, -1).reshape(per, -1)  # K ordered (*kernel, C_in/g)
            out.append(Problem(np.ascontiguousarray(mat), j, np.arange(j * per, (j + 1) * per)))
        return out
    if op == "ConvTranspose":
        c_in = view.shape[0]
        if c_in % g:
            return f"C_in={c_in} is not divisible by group={g}"
        per = c_in // g
        return [
            Problem(np.ascontiguousarray(view[j * per : (j + 1) * per].reshape(per, -1).T), j, None) for j in range(g)
        ]
    return f"{op} is not a weighted op"


def stats_shape(layer: Layer) -> tuple[int, int]:
    """(K per group, groups) of the layer's input statistics."""
    w = layer.weight_shape
    assert w is not None
    g = layer.group if layer.op_type in ("Conv", "ConvTranspose") else 1
    if layer.op_type == "Conv":
        return int(np.prod(w[1:], dtype=np.int64)), g
    if layer.op_type == "ConvTranspose":
        return w[0] // g, g
    assert layer.reduction_axis is not None
    return w[layer.reduction_axis], 1


# ---------------------------------------------------------------------------------------------- activations


def activation_rows(layer: Layer, x: np.ndarray) -> Iterator[tuple[int, np.ndarray, slice | None]]:
    """(group, rows [R, K], which flattened leading positions they are) for the layer's input value ``x``.

    The slice indexes the flattened leading dims of a MatMul/Gemm input (for row weights from an attention
    mask); it is None for convolutions, whose rows are patches.
    """
    op = layer.op_type
    if op in ("Gemm", "MatMul"):
        k, _ = stats_shape(layer)
        if op == "Gemm" and attr(layer.node, "transA", 0):
            x = x.T
        rows = x.reshape(-1, k)
        yield 0, rows, slice(0, rows.shape[0])
        return
    if op == "ConvTranspose":
        k, g = stats_shape(layer)
        pix = np.moveaxis(x, 1, -1).reshape(-1, k * g)
        for j in range(g):
            yield j, pix[:, j * k : (j + 1) * k], None
        return
    yield from _im2col(layer, x)


def _conv_pads(
    layer: Layer, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int], dilations: list[int]
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, from ``pads`` or ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID)."""
    auto = attr(layer.node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    rank = len(spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(rank):
            o = -(-spatial[i] // strides[i])
            total = max((o - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i], 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * rank
    pads = list(attr(layer.node, "pads", None) or [0] * (2 * rank))
    return [(int(pads[i]), int(pads[i + rank])) for i in range(rank)]


def _im2col(layer: Layer, x: np.ndarray) -> Iterator[tuple[int, np.ndarray, slice | None]]:
    """Conv patches per group, K ordered (*kernel, C_in/g), a few samples at a time."""
    w = layer.weight_shape
    assert w is not None
    kernel = tuple(int(d) for d in w[2:])
    rank = len(kernel)
    strides = [int(s) for s in (attr(layer.node, "strides", None) or [1] * rank)]
    dil = [int(d) for d in (attr(layer.node, "dilations", None) or [1] * rank)]
    g = layer.group
    c = x.shape[1]
    cg = c // g
    spatial = tuple(int(d) for d in x.shape[2:])
    pads = _conv_pads(layer, spatial, kernel, strides, dil)
    out_sp = [
        (spatial[i] + pads[i][0] + pads[i][1] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(rank)
    ]
    per_sample = int(np.prod(out_sp, dtype=np.int64)) * int(np.prod(kernel, dtype=np.int64)) * c * 8
    step = max(1, CHUNK_BYTES // max(per_sample, 1))
    for s0 in range(0, x.shape[0], step):
        xs = np.asarray(x[s0 : s0 + step])
        xp = np.pad(xs, [(0, 0), (0, 0), *pads])
        patches = np.empty((xs.shape[0], *out_sp, *kernel, c), dtype=xs.dtype)
        for offs in itertools.product(*(range(k) for k in kernel)):
            sl = tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offs, dil, strides, out_sp, strict=True)
            )
            src: tuple[Any, ...] = (slice(None), slice(None), *sl)
            win = xp[src]  # [S, C, *out]
            dest: tuple[Any, ...] = (slice(None),) * (1 + rank) + tuple(offs)
            patches[dest] = np.moveaxis(win, 1, -1)
        flat = patches.reshape(-1, int(np.prod(kernel, dtype=np.int64)), c)
        for j in range(g):
            yield j, flat[:, :, j * cg : (j + 1) * cg].reshape(flat.shape[0], -1), None
