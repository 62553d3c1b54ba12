"""Lower a Dense node marked `quantize="int8"` to the int8 kernel.

The step quantizes its input rows (`quantize_rows`: dynamic, per row, uint8 with a zero point)
into a scratch array, then runs `dense_int8_packed` with the weight quantized per output channel
and packed once per engine; dequantization, bias, activation and residual are its epilogue, so
the step reads and writes the same float32 buffers as the fp32 Dense step it replaces.

The quantized activations (uint8 [M, Kp]), their scales (float32 [M]) and zero points (uint8
[M]) live in the plan's per-arena float32 workspaces, viewed as bytes (Kp is a multiple of 4, so
[M, Kp / 4] float32 is exactly [M, Kp] uint8). Steps run one after another and nothing in the
scratch outlives its step, so every int8 step with the same M and Kp shares one set.

A quantized node with `layout="bsr"`, `block=[4, 1]` (the quantize pass's choice for a sparse
weight) runs the sparse int8 kernel (`sparseinfer.kernels.int8_sparse`) instead: the weight packed
as its nonzero 4 x 1 blocks, the rows quantized inside the kernel's first parallel region into the
same scratch, its relaid activations and output columns in workspaces shared per shape as well.
Two such steps where the first's result is read only by the second (BERT's FF1 -> FF2) are
chained (`find_int8_chains`): the intermediate goes from one to the other transposed, in a
workspace, never as a row-major tensor. A fused Q/K/V projection on the sparse int8 kernel hands
its result to the int8 attention the same way (`find_attention_chains`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import Node
from ..graph.reference import ENGINE_DOMAIN
from ..kernels import attention_int8 as k_attention_int8
from ..kernels import int8 as k_int8
from ..kernels import int8_sparse as k_int8_sparse
from .sparse_lowering import Chain, link_chains

if TYPE_CHECKING:
    from .plan import DenseOperands, Plan, Step


def packed_int8(plan: Plan, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`(packed, scale_w, colsum)` of the constant float32 [K, N] weight `name`, made once per
    engine; None if it cannot be quantized (a NaN or Inf in it, or K above the int32 limit)."""

    def make():
        w = plan.graph.const(name)
        if w.shape[0] > k_int8.MAX_K or not np.isfinite(w).all():
            return None
        return k_int8.pack_weight_int8(w)

    return plan.weights.get(("int8", name), make)


def packed_sparse_int8(plan: Plan, name: str) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray] | None:
    """`((indptr, indices, data), scale_w, colsum)` of the constant float32 [K, N] weight `name` in
    the sparse int8 format (nonzero 4 x 1 blocks), made once per engine; None as `packed_int8`."""

    def make():
        w = plan.graph.const(name)
        if w.shape[0] > k_int8.MAX_K or not np.isfinite(w).all():
            return None
        return k_int8_sparse.pack_weight_sparse_int8(w)

    return plan.weights.get(("int8_4x1", name), make)


def activation_scratch(plan: Plan, m: int, k: int) -> tuple[str, str, str]:
    """Names of the per-arena scratch for `m` quantized rows of `k` values (uint8 [m, Kp] as
    float32 [m, Kp / 4]), their scales (float32 [m]) and zero points (uint8 [m] in float32
    [ceil(m / 4)]), declared in the plan's workspaces. Every int8 step of the same shape (Dense,
    sparse, QDense) shares them: steps run one after another and the scratch does not outlive one."""
    kp = k_int8.padded_k(k)
    names = f"Dense_int8__xq__{m}x{kp}", f"Dense_int8__scale__{m}", f"Dense_int8__zp__{m}"
    plan.workspaces.update({names[0]: (m, kp // 4), names[1]: (m,), names[2]: ((m + 3) // 4,)})
    return names


def _sparse_int8(node: Node) -> bool:
    return node.attrs.get("layout") == "bsr" and [int(b) for b in node.attrs.get("block") or ()] == [4, 1]


def lower_dense_int8(plan: Plan, node: Node) -> Step | None:
    """A kernel step computing the Dense `node` in int8 (the sparse int8 kernel for a 4x1-block
    layout, else the dense one), or None when the int8 kernel does not apply (the caller then
    lowers it as usual): when no matmul kernel does (`dense_operands`), or the weight holds a
    NaN/Inf or has K above the kernel's int32 limit."""
    from .plan import _rows, dense_operands  # here, not at import: plan imports this module

    ops = dense_operands(plan.graph, node)
    if ops is None:
        return None
    if _sparse_int8(node):
        return _lower_sparse(plan, node, ops)
    quantized = packed_int8(plan, ops.w)
    if quantized is None:
        return None
    packed, w_scale, colsum = quantized
    x, residual, b, act, m, k, n = ops.x, ops.residual, ops.bias, ops.act, ops.m, ops.k, ops.n
    xq_ws, scale_ws, zp_ws = activation_scratch(plan, m, k)

    def call(env, out, arena):
        xq = arena[xq_ws].view(np.uint8)
        x_scale = arena[scale_ws]
        x_zp = arena[zp_ws].view(np.uint8)[:m]
        k_int8.quantize_rows(_rows(env[x]), xq, x_scale, x_zp)
        res = None if residual is None else _rows(env[residual])
        k_int8.dense_int8_packed(xq, x_scale, x_zp, packed, w_scale, colsum, b, res, out.reshape(-1, n), act)

    return plan._kernel(node, call, flops=2 * m * k * n)


def find_int8_chains(plan: Plan) -> dict[str, Chain]:
    """Pairs of sparse int8 Dense steps chained through a transposed float32 workspace: the
    producer (no residual) writes its result, activation applied, as the consumer's rows of
    ``X.T`` with each row's range (``CHAIN_WRITE``), and the consumer quantizes its input from
    there (``CHAIN_READ``), bit-identical to quantizing the row-major result (BERT's FF1 -> FF2:
    the 128 x 3072 intermediate is neither transposed back nor read row by row). Both must run
    on the sparse int8 kernel; a step does not both read and write a chain."""
    from .plan import dense_operands

    graph = plan.graph

    def link(node: Node, consumer: Node) -> tuple[str, tuple[int, ...]] | None:
        if not (_runs_sparse_int8(node) and _runs_sparse_int8(consumer)):
            return None
        p, q = dense_operands(graph, node), dense_operands(graph, consumer)
        if p is None or q is None or p.residual is not None or p.m != q.m or q.k != p.n:
            return None
        if packed_sparse_int8(plan, p.w) is None or packed_sparse_int8(plan, q.w) is None:
            return None
        return "Sparse_int8", k_int8_sparse.chain_workspace_shapes(p.m, p.n)["chain"]

    return link_chains(graph, link, through=False)


def find_attention_chains(plan: Plan, chains: dict[str, Chain]) -> dict[str, Chain]:
    """Fused Q/K/V projections handed to the int8 attention feature-major: a sparse int8 Dense (no
    residual, not reading a chain of ``chains``) whose result only an int8 Attention reads, as its
    q, k and v at once, writes that result transposed to a workspace (``CHAIN_WRITE``, no row
    ranges) and the attention quantizes its heads from there
    (:func:`~sparseinfer.kernels.attention_int8.attention_int8_chained`, bit-identical). What it
    saves: the attention's per-head quantization reads rows across the projection and reduces
    them horizontally; from the transposed layout the reductions are lane-wise and four rows of
    quantized keys are one packed word. Heads of a length and width the chained kernel takes
    (multiples of 64), and a mask the attention step takes (`attention_mask_ok`)."""
    from .plan import attention_mask_ok, dense_operands

    graph = plan.graph
    consumers = {id(c.consumer) for c in chains.values()}

    def link(node: Node, consumer: Node) -> tuple[str, tuple[int, ...]] | None:
        if consumer.domain != ENGINE_DOMAIN or consumer.op != "Attention" or consumer.attrs.get("quantize") != "int8":
            return None
        q, k, v = consumer.inputs[:3]
        if not (q == k == v == node.outputs[0]) or not _runs_sparse_int8(node) or id(node) in consumers:
            return None
        b, s = graph.info(q).shape[:2]
        hd = consumer.attrs.get("hidden", 0) or graph.info(q).shape[2]
        ops = dense_operands(graph, node)
        if ops is None or ops.residual is not None or ops.m != b * s or not attention_mask_ok(graph, consumer):
            return None
        if not k_attention_int8.chained_supported(s, hd // consumer.attrs["num_heads"]) or packed_sparse_int8(plan, ops.w) is None:
            return None
        return "Attention_int8__qkv", k_int8_sparse.chain_workspace_shapes(ops.m, ops.n)["chain"]

    return link_chains(graph, link, x_only=False)


def _runs_sparse_int8(node: Node) -> bool:
    return node.domain == ENGINE_DOMAIN and node.op == "Dense" and node.attrs.get("quantize") == "int8" and _sparse_int8(node)


def _lower_sparse(plan: Plan, node: Node, ops: DenseOperands) -> Step | None:
    """The sparse int8 kernel step of a Dense stored as nonzero 4 x 1 blocks, chained to its
    neighbour where `plan.sparse_chains` says (`find_int8_chains`)."""
    from .plan import Step, _rows

    quantized = packed_sparse_int8(plan, ops.w)
    if quantized is None:
        return None
    (indptr, indices, data), w_scale, colsum = quantized
    x, residual, b, act, m, k, n = ops.x, ops.residual, ops.bias, ops.act, ops.m, ops.k, ops.n
    shapes = k_int8_sparse.workspace_shapes(m, k)
    names = dict(zip(("xq", "x_scale", "x_zp"), activation_scratch(plan, m, k)))
    names.update({a: f"Sparse_int8__{a}__{'x'.join(map(str, shapes[a]))}" for a in ("xt", "xs", "ot")})
    plan.workspaces.update({names[a]: shapes[a] for a in ("xt", "xs", "ot")})
    kernel = k_int8_sparse.sparse_int8_kernel(m)
    src = plan.sparse_chains.get(x)
    src = src if src is not None and src.consumer is node else None
    dst = plan.sparse_chains.get(node.outputs[0])
    link = src or dst
    mode = k_int8_sparse.CHAIN_READ if src else k_int8_sparse.CHAIN_WRITE if dst else k_int8_sparse.CHAIN_NONE
    ranged = link is not None and link.consumer.op != "Attention"  # the attention does not need the row ranges
    if link is not None:
        link_shapes = k_int8_sparse.chain_workspace_shapes(m, link.shape[1])
        names["chain"] = link.workspace
        plan.workspaces[names["chain"]] = link_shapes["chain"]
        if ranged:
            names["crange"] = f"{link.workspace}__range"
            plan.workspaces[names["crange"]] = link_shapes["crange"]

    def scratch(arena):  # the workspace views in the kernel's order, once per arena
        ws = k_int8_sparse.as_kernel_operands({a: arena[names[a]] for a in ("xq", "x_scale", "x_zp", "xt", "xs", "ot")}, m)
        if link is None:
            chain, crange = k_int8_sparse.NO_CHAIN, k_int8_sparse.NO_RANGE
        else:
            chain = arena[names["chain"]]
            crange = arena[names["crange"]] if ranged else k_int8_sparse.NO_RANGE
        return ws["xq"], ws["x_scale"], ws["x_zp"], ws["xt"], ws["xs"], ws["ot"], chain, crange

    key = object()

    def call(env, out, arena):
        xin = None if src else _rows(env[x])
        res = None if residual is None else _rows(env[residual])
        kernel(xin, indptr, indices, data, w_scale, colsum, b, res, out.reshape(-1, n), act, *arena.derived(key, scratch), mode)

    flops = 2 * m * int(np.count_nonzero(ops.weight))
    if dst is None:
        return plan._kernel(node, call, flops=flops)
    no_out = np.empty((0, n), np.float32)  # only its column count is read: the result goes to the chain
    return Step(node, "kernel", lambda env, arena: call(env, no_out, arena), flops, buffer=False)
