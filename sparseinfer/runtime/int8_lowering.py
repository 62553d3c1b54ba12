"""Lower a Dense node marked `quantize="int8"` to the int8 kernel.

The step quantizes its input rows (`quantize_rows`: dynamic, per row, uint8 with a zero point)
into a scratch array, then runs `dense_int8_packed` with the weight quantized per output channel
and packed once per engine; dequantization, bias, activation and residual are its epilogue, so
the step reads and writes the same float32 buffers as the fp32 Dense step it replaces.

The quantized activations (uint8 [M, Kp]), their scales (float32 [M]) and zero points (uint8
[M]) live in the plan's per-arena float32 workspaces, viewed as bytes (Kp is a multiple of 4, so
[M, Kp / 4] float32 is exactly [M, Kp] uint8). Steps run one after another and nothing in the
scratch outlives its step, so every int8 step with the same M and Kp shares one set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import Node
from ..kernels import int8 as k_int8

if TYPE_CHECKING:
    from .plan import Plan, Step


def packed_int8(plan: Plan, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`(packed, scale_w, colsum)` of the constant float32 [K, N] weight `name`, made once per
    engine; None if it cannot be quantized (a NaN or Inf in it, or K above the int32 limit)."""

    def make():
        w = plan.graph.const(name)
        if w.shape[0] > k_int8.MAX_K or not np.isfinite(w).all():
            return None
        return k_int8.pack_weight_int8(w)

    return plan.weights.get(("int8", name), make)


def lower_dense_int8(plan: Plan, node: Node) -> Step | None:
    """A kernel step computing the Dense `node` in int8, or None when the int8 kernel does not
    apply (the caller then lowers it as usual): a weight that is not a finite float32 [K, N]
    constant or has K above the kernel's int32 limit, an input that is not float32, an
    activation without an epilogue, a bias computed at run time or one that broadcasts, a
    residual that broadcasts."""
    from .plan import _DENSE_ACT, _rows  # here, not at import: plan imports this module

    g = plan.graph
    x, w = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    residual = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    act = _DENSE_ACT.get(node.attrs.get("activation", "none"))
    weight = g.const(w)
    if act is None or weight is None or weight.dtype != np.float32 or weight.ndim != 2 or g.info(x).dtype != np.float32:
        return None
    k, n = weight.shape
    if bias is not None and (g.const(bias) is None or g.const(bias).size != n):
        return None
    if residual is not None and g.info(residual).shape != g.info(node.outputs[0]).shape:
        return None
    quantized = packed_int8(plan, w)
    if quantized is None:
        return None
    packed, w_scale, colsum = quantized
    b = None if bias is None else np.ascontiguousarray(g.const(bias).reshape(n), np.float32)
    m = int(np.prod(g.info(x).shape[:-1]))
    kp = k_int8.padded_k(k)
    xq_ws, scale_ws, zp_ws = f"Dense_int8__xq__{m}x{kp}", f"Dense_int8__scale__{m}", f"Dense_int8__zp__{m}"
    plan.workspaces.update({xq_ws: (m, kp // 4), scale_ws: (m,), zp_ws: ((m + 3) // 4,)})

    def call(env, out, arena):
        xq = arena[xq_ws].view(np.uint8)
        x_scale = arena[scale_ws]
        x_zp = arena[zp_ws].view(np.uint8)[:m]
        k_int8.quantize_rows(_rows(env[x]), xq, x_scale, x_zp)
        res = None if residual is None else _rows(env[residual])
        k_int8.dense_int8_packed(xq, x_scale, x_zp, packed, w_scale, colsum, b, res, out.reshape(-1, n), act)

    return plan._kernel(node, call, flops=2 * m * k * n)
