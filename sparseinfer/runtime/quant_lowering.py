"""Lower the matmuls of quantized ONNX files (see `passes/quant_import.py`) to the int8 kernel.

* `QDense`: quantize the input rows into the shared int8 scratch (per tensor as
  DynamicQuantizeLinear, `quantize_tensor`; or with the file's static scale and zero point,
  `quantize_static`), then `dense_int8_packed` with the file's int8 weight (packed once per
  engine, never re-quantized) and per-column scales; bias, activation and residual are its
  epilogue.
* `MatMulInteger` and `QLinearMatMul` with a constant int8 weight of zero point 0: the input
  (uint8, or int8 shifted to uint8 with its zero point) is copied into the scratch and the
  kernel's integer variant computes the exact int32 product; QLinearMatMul then requantizes it
  with the reference's own function (`graph.reference.requantize`), so both are exact.

Anything else returns None and the node runs on the reference executor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import Node
from ..graph.reference import requantize
from ..kernels import dense as k_dense
from ..kernels import int8 as k_int8
from .int8_lowering import activation_scratch

if TYPE_CHECKING:
    from .plan import Plan, Step


def _packed(plan: Plan, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(packed, colsum)` of the constant int8 [K, N] weight `name`, made once per engine."""
    return plan.weights.get(("int8-file", name), lambda: k_int8.pack_quantized(w))


def _int8_weight(plan: Plan, name: str) -> np.ndarray | None:
    w = plan.graph.const(name)
    if w is None or w.dtype != np.int8 or w.ndim != 2 or not 0 < w.shape[0] <= k_int8.MAX_K:
        return None
    return w


def _scalar(a: np.ndarray | None) -> bool:
    return a is not None and a.size == 1 and a.ndim <= 1


def lower_qdense(plan: Plan, node: Node) -> Step | None:
    """A kernel step for a QDense node, or None when the kernel does not apply (an activation
    without an epilogue, a bias or residual that broadcasts, K above the int32 limit, …)."""
    from .plan import _DENSE_ACT, _rows  # here, not at import: plan imports this module

    g = plan.graph
    x, wq, ws, xs, xz, bias, residual = tuple(node.inputs) + ("",) * (7 - len(node.inputs))
    act = _DENSE_ACT.get(node.attrs.get("activation", "none"))
    w = _int8_weight(plan, wq)
    if act is None or w is None or g.info(x).dtype != np.float32:
        return None
    k, n = w.shape
    w_scale = g.const(ws)
    if w_scale is None or w_scale.dtype != np.float32 or w_scale.size != n:
        return None
    w_scale = np.ascontiguousarray(w_scale.reshape(n))
    static = None
    if xs or xz:
        s, z = g.const(xs), g.const(xz)
        if not (_scalar(s) and _scalar(z)) or s.dtype != np.float32 or z.dtype != np.uint8:
            return None
        s = np.float32(s.reshape(()))
        if not (np.isfinite(s) and s > 0):
            return None
        static = (s, np.uint8(z.reshape(())))
    b = None
    if bias:
        b = g.const(bias)
        if b is None or b.size != n:
            return None
        b = np.ascontiguousarray(b.reshape(n), np.float32)
    if residual and g.info(residual).shape != g.info(node.outputs[0]).shape:
        return None
    packed, colsum = _packed(plan, wq, w)
    m = int(np.prod(g.info(x).shape[:-1]))
    xq_ws, scale_ws, zp_ws = activation_scratch(plan, m, k)

    def call(env, out, arena):
        xq = arena[xq_ws].view(np.uint8)
        x_scale = arena[scale_ws]
        x_zp = arena[zp_ws].view(np.uint8)[:m]
        if static is None:
            k_int8.quantize_tensor(_rows(env[x]), xq, x_scale, x_zp)
        else:
            k_int8.quantize_static(_rows(env[x]), xq, x_scale, x_zp, *static)
        res = None if not residual else _rows(env[residual])
        k_int8.dense_int8_packed(xq, x_scale, x_zp, packed, w_scale, colsum, b, res, out.reshape(-1, n), act)

    return plan._kernel(node, call, flops=2 * m * k * n)


def lower_integer_matmul(plan: Plan, node: Node) -> Step | None:
    """A kernel step for MatMulInteger or QLinearMatMul whose weight is a constant int8 [K, N]
    with zero point 0 and whose input has a per-tensor zero point; None otherwise."""
    g = plan.graph
    if node.op == "MatMulInteger":
        a, b, azp, bzp = tuple(node.inputs) + ("",) * (4 - len(node.inputs))
        scales = None
    else:
        a, a_scale, azp, b, b_scale, bzp, y_scale, y_zp = node.inputs
        scales = [g.const(i) for i in (a_scale, b_scale, y_scale, y_zp)]
        if any(c is None for c in scales):
            return None
    w = _int8_weight(plan, b)
    info = g.info(a)
    if w is None or info.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)) or info.rank is None or info.rank < 2:
        return None
    if bzp and (g.const(bzp) is None or g.const(bzp).any()):
        return None
    zero = np.zeros((), info.dtype) if not azp else g.const(azp)
    if not _scalar(zero) or zero.dtype != info.dtype:
        return None
    k, n = w.shape
    if info.shape[-1] != k:
        return None
    signed = info.dtype == np.int8
    # int8 activations as uint8: v + 128 (the bytes XOR 0x80), and the zero point moves with them
    zp = np.uint8(int(zero.reshape(())) + (128 if signed else 0))
    packed, colsum = _packed(plan, b, w)
    m = int(np.prod(info.shape[:-1]))
    xq_ws, _, zp_ws = activation_scratch(plan, m, k)
    acc_ws = None
    if scales is not None:
        acc_ws = f"QLinearMatMul__acc__{m}x{n}"
        plan.workspaces[acc_ws] = (m, n)

    def call(env, out, arena):
        xq = arena[xq_ws].view(np.uint8)  # padding columns meet zero weight rows: any value will do
        rows = np.ascontiguousarray(env[a]).reshape(m, k).view(np.uint8)
        if signed:
            np.bitwise_xor(rows, 0x80, out=xq[:, :k])
        else:
            xq[:, :k] = rows
        x_zp = arena[zp_ws].view(np.uint8)[:m]
        x_zp[:] = zp
        acc = out.reshape(m, n) if acc_ws is None else arena[acc_ws].view(np.int32)
        k_int8.dense_int8_packed(xq, None, x_zp, packed, None, colsum, None, None, acc, k_dense.ACT_NONE)
        if acc_ws is not None:
            out[...] = requantize(acc.reshape(out.shape), *scales)

    return plan._kernel(node, call, flops=2 * m * k * n)
