"""Lower an optimized, statically shaped Graph to an ordered list of steps.

A step is a kernel call (Dense, LayerNormalization, Attention, Gelu — the ops that carry the
FLOPs) or, for everything else, the op's NumPy reference function. Kernel outputs live in
preallocated buffers reused across steps by liveness (peak activation memory is reported);
each concurrent `run` gets its own set of buffers (an arena) from a pool, so runs from several
threads never share memory. Dispatch on op, dtype and layout happens here, once.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numba
import numpy as np

from ..graph import Graph, Node
from ..graph.reference import ENGINE_DOMAIN
from ..graph.registry import lookup_version
from ..kernels import attention as k_attention
from ..kernels import attention_int8 as k_attention_int8
from ..kernels import dense as k_dense
from ..kernels import elementwise as k_elementwise
from ..kernels import norm as k_norm
from ..kernels.sparse_formats import aligned_empty
from .embedding_lowering import lower_attention_mask_row, lower_embedding
from .feature_major import find_feature_major
from .int8_lowering import find_attention_chains, find_int8_chains, lower_dense_int8
from .quant_lowering import lower_integer_matmul, lower_qdense
from .sparse_lowering import lower_sparse_dense

_DENSE_ACT = {"none": k_dense.ACT_NONE, "gelu": k_dense.ACT_GELU, "tanh": k_dense.ACT_TANH, "relu": k_dense.ACT_RELU}


@dataclass
class Step:
    node: Node
    kind: str  # "kernel" or "reference"
    fn: Callable  # fn(env, arena) -> None: reads inputs from env, writes outputs into env
    flops: int = 0
    buffer: bool = True  # a kernel step's output gets an arena buffer (not when chained: sparse_lowering)


@dataclass
class BufferPlan:
    """Where each kernel output lives: slot index per value, and each slot's size in bytes."""

    slot_of: dict[str, int] = field(default_factory=dict)
    slot_bytes: list[int] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.slot_bytes)


class Arena(dict):
    """One set of run buffers by value name (kernel outputs and workspaces), plus what steps
    derive from them: views in the form a kernel takes, made on a step's first run in this arena
    and reused by its later runs (`derived`). A warm BERT-base step is tens of microseconds; the
    per-call Python around it should not be several."""

    def __init__(self) -> None:
        super().__init__()
        self.memo: dict[object, object] = {}

    def derived(self, key: object, make: Callable[[Arena], object]):
        """``make(self)``, computed once per arena (``key``: one per step, e.g. a fresh ``object()``)."""
        v = self.memo.get(key)
        if v is None:
            v = self.memo[key] = make(self)
        return v


class Plan:
    """A graph compiled for one set of input shapes."""

    def __init__(self, graph: Graph, weights: WeightCache | None = None, chain_sparse: bool = True) -> None:
        for name, v in graph.values.items():
            if not v.is_const and not v.info.is_static:
                raise ValueError(f"cannot plan {graph.name!r}: value {name!r} has no static shape ({v.info}); bind the input shapes first")
        self.graph = graph
        self.weights = weights or WeightCache()
        self.workspaces: dict[str, tuple[int, ...]] = {}  # per-arena float32 scratch arrays kernels ask for
        # chain_sparse=False: every value row-major, no workspace shared between steps (for comparisons)
        # fp32 activations held feature-major between the steps that read and write them so
        self.feature_major = find_feature_major(self) if chain_sparse else {}
        # pairs of steps on the sparse int8 kernel sharing a workspace
        self.sparse_chains = find_int8_chains(self) if chain_sparse else {}
        if chain_sparse:  # and fused Q/K/V projections handed to the int8 attention transposed
            self.sparse_chains.update(find_attention_chains(self, self.sparse_chains))
        self.steps = [self._lower(n) for n in graph.nodes]
        self.buffers = self._plan_buffers()
        self._consts = {n: v.const for n, v in graph.values.items() if v.is_const}
        self._arenas: queue.SimpleQueue = queue.SimpleQueue()

    # ------------------------------------------------------------------ lowering
    def _lower(self, node: Node) -> Step:
        g = self.graph
        if node.domain == ENGINE_DOMAIN and node.op == "Dense":
            step = lower_dense_int8(self, node) if node.attrs.get("quantize") == "int8" else None
            if step is None:
                step = self._lower_dense(node)
        elif node.domain == ENGINE_DOMAIN and node.op == "QDense":
            step = lower_qdense(self, node)
        elif node.domain == "" and node.op in ("MatMulInteger", "QLinearMatMul"):  # integer inputs: not the float32 check below
            return lower_integer_matmul(self, node) or self._reference(node)
        elif node.domain == ENGINE_DOMAIN and node.op in ("Embedding", "AttentionMaskRow"):  # integer or constant first inputs
            lower = lower_embedding if node.op == "Embedding" else lower_attention_mask_row
            return lower(self, node) or self._reference(node)
        elif node.domain == ENGINE_DOMAIN and node.op == "Attention":
            step = self._lower_attention(node)
        elif node.domain == "" and node.op == "LayerNormalization":
            step = self._lower_layernorm(node)
        elif node.domain == "" and node.op == "Gather" and g.const(node.inputs[1]) is not None:
            step = self._lower_gather(node)
        elif node.domain == "" and node.op == "Gelu" and node.attrs.get("approximate", "none") == "none":
            step = self._kernel(node, lambda env, out, arena, x=node.inputs[0]: k_elementwise.gelu(_rows(env[x]), _out_rows(out)))
        else:
            step = None
        if step is None or g.info(node.inputs[0]).dtype != np.float32:
            return self._reference(node)
        return step

    def _kernel(self, node: Node, call: Callable, flops: int = 0) -> Step:
        out = node.outputs[0]

        def fn(env, arena):
            buf = arena[out]
            call(env, buf, arena)
            env[out] = buf

        return Step(node, "kernel", fn, flops)

    def _reference(self, node: Node) -> Step:
        impl = lookup_version(node.op, node.version, node.domain).fn
        ins, outs, attrs = node.inputs, node.outputs, node.attrs

        def fn(env, arena):
            result = impl(*(env[i] if i else None for i in ins), **attrs)
            for name, arr in zip(outs, result if isinstance(result, tuple) else (result,)):
                if name:
                    env[name] = np.asarray(arr)

        return Step(node, "reference", fn)

    def _lower_dense(self, node: Node) -> Step | None:
        ops = dense_operands(self.graph, node)
        if ops is None:
            return None
        layout = node.attrs.get("layout", "dense")
        if layout in ("csr", "bsr"):
            return self._lower_sparse_dense(node, layout, ops)
        packed = self.weights.get(("dense", ops.w), lambda: k_dense.pack_weight(ops.weight))

        def call(env, out, arena):
            res = None if ops.residual is None else _rows(env[ops.residual])
            k_dense.dense_packed(_rows(env[ops.x]), packed, ops.bias, res, _out_rows(out), ops.act)

        return self._kernel(node, call, flops=2 * ops.m * ops.k * ops.n)

    def _lower_sparse_dense(self, node: Node, layout: str, ops: DenseOperands) -> Step:
        """A Dense whose weight the layout pass chose to store as CSR or r x c blocks."""
        return lower_sparse_dense(self, node, layout, ops)

    def _lower_layernorm(self, node: Node) -> Step:
        ops = layernorm_operands(self.graph, node)
        if ops is None:
            return None
        x, gm, bt, eps = ops
        fm_in, fm_out = x in self.feature_major, node.outputs[0] in self.feature_major
        if not fm_in and not fm_out:
            return self._kernel(node, lambda env, out, arena: k_norm.layernorm_packed(_rows(env[x]), None, gm, bt, eps, _out_rows(out)))
        m = int(np.prod(self.graph.info(x).shape[:-1]))
        no_rows, no_fm = np.empty((0, gm.size), np.float32), np.empty((0, 0, 0), np.float32)
        if not fm_in:  # row-major in (e.g. the embeddings' sum), feature-major out
            return self._kernel(
                node, lambda env, out, arena: k_norm.layernorm_rows_fm(_rows(env[x]), gm, bt, eps, out, numba.get_num_threads())
            )
        if fm_out:
            return self._kernel(
                node, lambda env, out, arena: k_norm.layernorm_fm(env[x], gm, bt, eps, out, no_rows, m, numba.get_num_threads())
            )
        return self._kernel(
            node, lambda env, out, arena: k_norm.layernorm_fm(env[x], gm, bt, eps, no_fm, _out_rows(out), m, numba.get_num_threads())
        )

    def _lower_gather(self, node: Node) -> Step | None:
        """A Gather of float32 data with constant, in-range indices: a copy kernel (a reference
        step would raise on a bad index; that path keeps its error)."""
        g = self.graph
        x, idx = node.inputs
        shape = g.info(x).shape
        axis = node.attrs.get("axis", 0)
        if not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shape)
        dim = shape[axis]
        ids = np.asarray(g.const(idx))
        if ids.dtype.kind not in "iu" or ((ids < -dim) | (ids >= dim)).any():
            return None
        flat = np.ascontiguousarray(np.where(ids < 0, ids + dim, ids).reshape(-1), np.int64)
        pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1 :]))
        x_shape, out_shape = (pre, dim, post), (pre, flat.size, post)

        def call(env, out, arena):
            k_elementwise.take(np.ascontiguousarray(env[x]).reshape(x_shape), flat, out.reshape(out_shape))

        return self._kernel(node, call)

    def _lower_attention(self, node: Node) -> Step | None:
        g = self.graph
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
        b, sq = g.info(q).shape[:2]
        s = g.info(k).shape[1]  # keys; fewer queries when only some rows are read (passes/rows.py)
        hd = node.attrs.get("hidden", 0) or g.info(q).shape[2]
        cols = [int(node.attrs.get(f"{t}_offset", 0)) for t in "qkv"]
        h = node.attrs["num_heads"]
        d = hd // h
        if not attention_mask_ok(g, node):
            return None  # a mask varying per query row (or head): the reference handles it
        ms = g.info(mask).shape if mask is not None else None
        scale = np.float32(node.attrs["scale"])
        if q in self.feature_major:  # Q, K and V read feature-major (runtime/feature_major.py)
            return self._lower_attention_fm(node, mask, b, s, h, d, cols)
        # the int8 kernel (kernels/attention_int8.py) takes as many queries as keys; a step with
        # fewer queries runs the fp32 kernel (quantize="int8" allows int8, it does not require it)
        int8 = node.attrs.get("quantize") == "int8" and sq == s
        kmod = k_attention_int8 if int8 else k_attention
        nth = max(1, min(k_attention.numba.config.NUMBA_NUM_THREADS, b * h))
        shapes = kmod.workspace_shapes(s, d, nth)
        # one set of scratch arrays per arena for every Attention step of this shape: steps of a
        # run execute one after another and nothing in the workspace outlives its step, so the
        # layers share it (BERT-base: 256 KiB per arena instead of 3 MiB; same speed)
        tag = "Attention_int8" if int8 else "Attention"
        ws_names = [f"{tag}__ws{i}__{'x'.join(map(str, shape))}" for i, shape in enumerate(shapes)]
        self.workspaces.update(zip(ws_names, shapes))

        key = object()
        chain = self.sparse_chains.get(q)  # Q, K, V transposed in a workspace (find_attention_chains)
        chain = chain.workspace if chain is not None and chain.consumer is node else None

        def call(env, out, arena):
            m = None if mask is None else _mask_rows(env[mask], ms, b, s)
            wss = arena.derived(key, lambda a: [a[n] for n in ws_names])
            threads = max(1, min(k_attention.numba.get_num_threads(), wss[0].shape[0], b * h))
            if chain is not None:
                k_attention_int8.attention_int8_chained(arena[chain], *cols, m, b, s, h, d, scale, _out_rows(out), wss[0], threads)
                return
            xq = _rows(env[q])  # BERT's Q, K and V are column ranges of one fused projection
            xk = xq if k == q else _rows(env[k])
            xv = xq if v == q else _rows(env[v])
            x = (xq, xk, xv, *cols, m, b, s, h, d, scale, _out_rows(out))
            if int8:
                k_attention_int8.attention_int8_packed(*x, wss[0], threads)
            else:
                k_attention.attention_packed(*x, *wss, threads)

        flops = 4 * b * h * sq * s * d
        return self._kernel(node, call, flops)

    def _lower_attention_fm(self, node: Node, mask: str | None, b: int, s: int, h: int, d: int, cols: list[int]) -> Step:
        """An fp32 attention reading its fused Q/K/V projection feature-major, writing the context
        feature-major too when its reader takes it so (:func:`~sparseinfer.kernels.attention.attention_fm_packed`)."""
        q = node.inputs[0]
        ms = self.graph.info(mask).shape if mask is not None else None
        scale = np.float32(node.attrs["scale"])
        nth = max(1, min(k_attention.numba.config.NUMBA_NUM_THREADS, b * h))
        shapes = k_attention.fm_workspace_shapes(s, d, nth)
        ws_names = [f"Attention_fm__ws{i}__{'x'.join(map(str, shape))}" for i, shape in enumerate(shapes)]
        self.workspaces.update(zip(ws_names, shapes))
        fm_out = node.outputs[0] in self.feature_major
        no_rows, no_fm = np.empty((0, h * d), np.float32), np.empty((0, 0, 0), np.float32)
        key = object()

        def call(env, out, arena):
            m = None if mask is None else _mask_rows(env[mask], ms, b, s)
            wss = arena.derived(key, lambda a: [a[n] for n in ws_names])
            threads = max(1, min(k_attention.numba.get_num_threads(), wss[0].shape[0], b * h))
            rows, fm = (no_rows, out) if fm_out else (_out_rows(out), no_fm)
            k_attention.attention_fm_packed(env[q], *cols, m, b, s, h, d, scale, rows, fm, *wss, threads)

        return self._kernel(node, call, 4 * b * h * s * s * d)

    # ------------------------------------------------------------------ buffers
    def _aliases(self) -> dict[str, frozenset[str]]:
        """For each value, the kernel outputs whose buffer it may share memory with. A kernel
        output is its own buffer; a reference step may return a NumPy view of an input (Reshape,
        Squeeze, Split, Transpose…), so its outputs conservatively alias all of its inputs'."""
        alias: dict[str, frozenset[str]] = {}
        for st in self.steps:
            if st.kind == "kernel":
                alias[st.node.outputs[0]] = frozenset(st.node.outputs[:1])
            else:
                shared = frozenset().union(*(alias.get(i, frozenset()) for i in st.node.inputs if i))
                for o in st.node.outputs:
                    if o:
                        alias[o] = shared
        return alias

    def _plan_buffers(self) -> BufferPlan:
        """Greedy reuse by liveness: a kernel output takes the smallest free slot big enough,
        or a new one; a slot is free again once every value that may alias it has been read
        for the last time (graph outputs stay live to the end)."""
        g = self.graph
        alias = self._aliases()
        end = len(self.steps)
        last_use: dict[str, int] = {}  # kernel output → last step reading it or any alias of it
        for i, st in enumerate(self.steps):
            for name in st.node.inputs:
                for root in alias.get(name, ()):
                    last_use[root] = i
        for name in g.outputs:
            for root in alias.get(name, ()):
                last_use[root] = end
        plan = BufferPlan()
        free: list[int] = []
        releases: dict[int, list[str]] = {}
        for i, st in enumerate(self.steps):
            if st.kind == "kernel" and st.buffer:
                out = st.node.outputs[0]
                info = g.info(out)
                need = int(np.prod(self.feature_major.get(out, info.shape))) * info.dtype.itemsize
                fits = sorted((plan.slot_bytes[s], s) for s in free if plan.slot_bytes[s] >= need)
                if fits:
                    slot = fits[0][1]
                    free.remove(slot)
                elif free:  # grow the largest free slot rather than add one
                    slot = max(free, key=lambda s: plan.slot_bytes[s])
                    free.remove(slot)
                    plan.slot_bytes[slot] = need
                else:
                    slot = len(plan.slot_bytes)
                    plan.slot_bytes.append(need)
                plan.slot_of[out] = slot
                releases.setdefault(last_use.get(out, i), []).append(out)
            for root in releases.pop(i, ()):
                free.append(plan.slot_of[root])
        self._output_aliases = {o: bool(alias.get(o)) for o in g.outputs}
        return plan

    def _new_arena(self) -> Arena:
        g = self.graph
        slots = [aligned_empty(n, np.uint8) for n in self.buffers.slot_bytes]  # 64-byte aligned, as the workspaces
        arena = Arena()
        for name, slot in self.buffers.slot_of.items():
            info = g.info(name)
            shape = self.feature_major.get(name, info.shape)
            count = int(np.prod(shape))
            arena[name] = slots[slot][: count * info.dtype.itemsize].view(info.dtype).reshape(shape)
        for name, shape in self.workspaces.items():
            arena[name] = aligned_empty(shape, np.float32)  # 64-byte aligned: the kernels load whole cache lines
        return arena

    @property
    def workspace_bytes(self) -> int:
        return sum(int(np.prod(s)) * 4 for s in self.workspaces.values())

    # ------------------------------------------------------------------ running
    def run(self, feeds: Mapping[str, np.ndarray], timings: list | None = None) -> list[np.ndarray]:
        try:
            arena = self._arenas.get_nowait()
        except queue.Empty:
            arena = self._new_arena()
        try:
            env: dict[str, np.ndarray] = dict(self._consts)
            env.update(feeds)
            for st in self.steps:
                t0 = time.perf_counter() if timings is not None else 0.0
                st.fn(env, arena)
                if timings is not None:
                    timings.append((st, time.perf_counter() - t0))
            # outputs may sit in (or view) reused buffers: hand out copies the next run cannot overwrite
            return [np.array(env[o], copy=True) if self._output_aliases[o] else env[o] for o in self.graph.outputs]
        finally:
            self._arenas.put(arena)


@dataclass(frozen=True)
class DenseOperands:
    """A Dense node's operands in the form every matmul kernel takes."""

    x: str  # activations [..., K] (a value name)
    w: str  # the weight's name (the key its packed forms are cached under)
    weight: np.ndarray  # [K, N] float32 constant
    bias: np.ndarray | None  # float32 [N], contiguous
    residual: str | None  # a value of the output's shape
    act: int  # the kernels' ACT_* code
    m: int
    k: int
    n: int


def layernorm_operands(graph: Graph, node: Node) -> tuple[str, np.ndarray, np.ndarray, np.float32] | None:
    """``(x, gamma, beta, eps)`` of a LayerNormalization the norm kernels run (over the last axis,
    one output, float32 input, constant scale and bias of ``N`` values or broadcasting to them),
    else None (the reference step runs it)."""
    if node.domain != "" or node.op != "LayerNormalization" or len(node.outputs) != 1 or not _last_axis(graph, node):
        return None
    x, gamma = node.inputs[:2]
    beta = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if graph.info(x).dtype != np.float32 or graph.const(gamma) is None or (beta is not None and graph.const(beta) is None):
        return None
    n = graph.info(x).shape[-1]
    try:  # ONNX lets scale and bias broadcast (e.g. shape [1]); the kernel reads n of each
        gm = np.ascontiguousarray(np.broadcast_to(graph.const(gamma).reshape(-1), (n,)), np.float32)
        bt = (
            np.zeros(n, np.float32)
            if beta is None
            else np.ascontiguousarray(np.broadcast_to(graph.const(beta).reshape(-1), (n,)), np.float32)
        )
    except ValueError:
        return None
    return x, gm, bt, np.float32(node.attrs.get("epsilon", 1e-5))


def attention_mask_ok(graph: Graph, node: Node) -> bool:
    """Whether the attention step takes `node`'s mask: none, or additive ``[B or 1, 1, 1, S or 1]``
    (a mask varying per query row or head goes to the reference executor)."""
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    if mask is None:
        return True
    b, s = graph.info(node.inputs[0]).shape[0], graph.info(node.inputs[1]).shape[1]  # batch, keys
    ms = graph.info(mask).shape
    return len(ms) == 4 and ms[1] == 1 and ms[2] == 1 and ms[0] in (1, b) and ms[3] in (1, s)


def dense_operands(graph: Graph, node: Node) -> DenseOperands | None:
    """The operands of a Dense node for the matmul kernels (fp32 dense, sparse or int8), or None
    when no kernel applies and the reference step must run it: an input or weight that is not
    float32, a weight that is not a [K, N] constant, an activation without an epilogue, a bias
    computed at run time or one that broadcasts, a residual that broadcasts."""
    x, w = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    residual = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    act = _DENSE_ACT.get(node.attrs.get("activation", "none"))
    weight = graph.const(w)
    if act is None or weight is None or weight.dtype != np.float32 or weight.ndim != 2 or graph.info(x).dtype != np.float32:
        return None
    k, n = weight.shape
    if bias is not None and (graph.const(bias) is None or graph.const(bias).size != n):
        return None
    if residual is not None and graph.info(residual).shape != graph.info(node.outputs[0]).shape:
        return None
    b = None if bias is None else np.ascontiguousarray(graph.const(bias).reshape(n), np.float32)
    m = int(np.prod(graph.info(x).shape[:-1]))
    return DenseOperands(x, w, weight, b, residual, act, m, k, n)


class WeightCache:
    """Packed forms of constant weights (per format), shared by every plan of an engine."""

    def __init__(self) -> None:
        self._packed: dict[tuple, object] = {}

    def get(self, key: tuple, make: Callable[[], object]):
        if key not in self._packed:
            self._packed[key] = make()
        return self._packed[key]


def _rows(a: np.ndarray) -> np.ndarray:
    """A C-contiguous [rows, last dim] array (kernels take 2-D row-major arrays); a copy only if
    a reference step handed over a strided view."""
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a)


def _out_rows(a: np.ndarray) -> np.ndarray:
    """The [rows, last dim] view of an output buffer (arena buffers are contiguous: never a copy)."""
    return a.reshape(-1, a.shape[-1])


def _mask_rows(mask: np.ndarray, ms: tuple[int, ...], b: int, s: int) -> np.ndarray:
    """An attention step's additive mask ``[B or 1, 1, 1, S or 1]`` as the kernels take it: float32 ``[B, S]``."""
    m = mask.reshape(ms[0], ms[3])
    return np.ascontiguousarray(m if (ms[0], ms[3]) == (b, s) else np.broadcast_to(m, (b, s)), np.float32)


def _last_axis(graph: Graph, node: Node) -> bool:
    rank = graph.info(node.inputs[0]).rank
    return rank is not None and node.attrs.get("axis", -1) % rank == rank - 1
