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
    apply (the caller then lowers it as usual): when no matmul kernel does (`dense_operands`),
    or the weight holds a NaN/Inf or has K above the kernel's int32 limit."""
    from .plan import _rows, dense_operands  # here, not at import: plan imports this module

    ops = dense_operands(plan.graph, node)
    if ops is None:
        return None
    quantized = packed_int8(plan, ops.w)
    if quantized is None:
        return None
    packed, w_scale, colsum = quantized
    x, residual, b, act, m, k, n = ops.x, ops.residual, ops.bias, ops.act, ops.m, ops.k, ops.n
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
