"""Fusions: rewrite the op patterns exporters emit into the ops our kernels implement.

Each fusion is a `(anchor op, fn)` entry: `fn(graph, index, node)` looks at the neighbourhood of
an anchor node and returns the list of nodes that replace the pattern's last node, or None.
Nodes the pattern used become dead and are removed by dead-code elimination afterwards.

Ordering (declared in `default_pipeline`): constants must be folded first (the attention scale
and the reshape targets are computed at run time by exporters); LayerNorm and GELU before Dense
(Dense absorbs a following Gelu); Dense before attention (attention reads Dense outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..graph import Graph, Node, TensorInfo
from ..graph.reference import ENGINE_DOMAIN, lookup_version
from ..graph.shapes import infer_shapes
from .manager import PassContext, function_pass


class Index:
    """Producer and consumer lookups for one state of a graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.prod: dict[str, Node] = {}
        self.cons: dict[str, list[Node]] = {}
        for n in graph.nodes:
            for o in n.outputs:
                self.prod[o] = n
            for i in dict.fromkeys(n.inputs):  # a node reading a value twice is one consumer
                self.cons.setdefault(i, []).append(n)

    def producer(self, name: str, op: str | None = None) -> Node | None:
        n = self.prod.get(name)
        return n if n is not None and (op is None or (n.op == op and n.domain == "")) else None

    def only_consumer(self, name: str, op: str | None = None) -> Node | None:
        """The single node reading `name` (and not a graph output), optionally of type `op`."""
        users = self.cons.get(name, [])
        if len(users) != 1 or name in self.graph.outputs:
            return None
        n = users[0]
        return n if op is None or (n.op == op and n.domain == "") else None

    def scalar(self, name: str) -> float | None:
        c = self.graph.const(name)
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

    def other(self, node: Node, name: str) -> str:
        """For a binary node, the input that is not `name`."""
        a, b = node.inputs
        return b if a == name else a


# fn(graph, index, anchor) → (the pattern's last node, its replacement nodes), or None
Fusion = Callable[[Graph, Index, Node], tuple[Node, list[Node]] | None]


def until_stable(graph: Graph, step: Callable[[Graph, Index, Node], bool]) -> int:
    """Call ``step(graph, index, node)`` on the nodes in order until no call changes the graph; after
    each change the scan starts again (the index is stale) and unused nodes are dropped. Returns
    the number of changes; shapes are inferred again if there were any."""
    count = 0
    progress = True
    while progress:
        progress = False
        index = Index(graph)
        for node in graph.nodes:
            if step(graph, index, node):
                count += 1
                progress = True
                break  # the index is stale now: rescan
        graph.remove_unused()
    if count:
        infer_shapes(graph)
    return count


def _rewrite(graph: Graph, table: dict[str, Fusion]) -> int:
    """Apply a fusion table until nothing matches. Returns the number of rewrites."""

    def step(graph: Graph, index: Index, node: Node) -> bool:
        fn = table.get(node.op) if node.domain == "" else None
        result = fn(graph, index, node) if fn is not None else None
        if result is None:
            return False
        last, new = result
        graph.replace_node(last, new)
        return True

    return until_stable(graph, step)


def _close(value: float | None, target: float, rel: float = 1e-4) -> bool:
    return value is not None and abs(value - target) <= rel * abs(target)


def _last_axis(graph: Graph, node: Node) -> bool:
    """A reduction over the last axis only, keeping dims."""
    axes = graph.const(node.inputs[1]) if len(node.inputs) > 1 else None
    rank = graph.info(node.inputs[0]).rank
    return axes is not None and axes.size == 1 and rank is not None and int(axes[0]) % rank == rank - 1 and node.attrs.get("keepdims", 1)


# ----------------------------------------------------------------------------- LayerNorm


def _fuse_layernorm(graph: Graph, ix: Index, div: Node):
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) [* gamma] [+ beta] → LayerNormalization."""
    d, s = div.inputs
    sub, sqrt = ix.producer(d, "Sub"), ix.producer(s, "Sqrt")
    if sub is None or sqrt is None:
        return None
    x, m = sub.inputs
    mean = ix.producer(m, "ReduceMean")
    add_eps = ix.producer(sqrt.inputs[0], "Add")
    if mean is None or mean.inputs[0] != x or not _last_axis(graph, mean) or add_eps is None:
        return None
    var_name = next((i for i in add_eps.inputs if ix.scalar(i) is None), None)
    eps = ix.scalar(ix.other(add_eps, var_name)) if var_name else None
    var = ix.producer(var_name, "ReduceMean") if var_name else None
    if eps is None or var is None or not _last_axis(graph, var):
        return None
    sq = ix.producer(var.inputs[0])
    is_square = (
        sq is not None
        and sq.domain == ""
        and ((sq.op == "Pow" and sq.inputs[0] == d and ix.scalar(sq.inputs[1]) == 2.0) or (sq.op == "Mul" and sq.inputs == (d, d)))
    )
    users = ix.cons.get(d, [])
    if not is_square or len(users) != 2 or sq not in users or div not in users:
        return None
    n, rank = graph.info(x).shape[-1], graph.info(x).rank
    last, gamma, beta = div, None, None
    mul = ix.only_consumer(div.outputs[0], "Mul")
    if mul is not None and _vector(graph, ix.other(mul, div.outputs[0]), n, rank):
        last, gamma = mul, ix.other(mul, div.outputs[0])
        add = ix.only_consumer(mul.outputs[0], "Add")
        if add is not None and _vector(graph, ix.other(add, mul.outputs[0]), n, rank):
            last, beta = add, ix.other(add, mul.outputs[0])
    dtype = graph.info(x).dtype
    if gamma is None:
        if not isinstance(n, int):
            return None  # a gamma of ones needs the size; leave a symbolic-width LayerNorm unfused
        gamma = graph.add_constant(graph.fresh_name("ln_gamma"), np.ones(n, dtype))
    inputs = (x, _flat(graph, gamma)) + ((_flat(graph, beta),) if beta else ())
    ln = Node("LayerNormalization", inputs, last.outputs[:1], {"axis": -1, "epsilon": eps}, name=last.name or "layernorm", version=17)
    return last, [ln]


def _vector(graph: Graph, name: str, n: int, rank: int | None) -> bool:
    """A constant of n values along the last axis that broadcasting against a rank-`rank`
    tensor cannot change the shape of (so a [1, 1, n] operand of a rank-2 tensor is not one)."""
    c = graph.const(name)
    return c is not None and c.size == n and c.shape[-1] == n and rank is not None and c.ndim <= rank


def _flat(graph: Graph, name: str) -> str:
    c = graph.const(name)
    if c.ndim == 1:
        return name
    return graph.add_constant(graph.fresh_name(name), c.reshape(-1))


# ----------------------------------------------------------------------------- GELU


def _gelu_tail(graph: Graph, ix: Index, inner: Node, x: str):
    """The common tail of both GELU forms: 0.5 * x * (1 + inner(x)), in the orders exporters use."""
    add1 = ix.only_consumer(inner.outputs[0], "Add")
    if add1 is None or ix.scalar(ix.other(add1, inner.outputs[0])) != 1.0:
        return None
    mul = ix.only_consumer(add1.outputs[0], "Mul")
    if mul is None:
        return None
    factor = ix.other(mul, add1.outputs[0])
    if factor == x:  # (x * (1 + ·)) * 0.5
        half = ix.only_consumer(mul.outputs[0], "Mul")
        if half is not None and ix.scalar(ix.other(half, mul.outputs[0])) == 0.5:
            return half
        return None
    if ix.scalar(factor) == 0.5:  # x * (0.5 * (1 + ·)), as the dynamo exporter writes it
        outer = ix.only_consumer(mul.outputs[0], "Mul")
        return outer if outer is not None and ix.other(outer, mul.outputs[0]) == x else None
    pre = ix.producer(factor, "Mul")  # (0.5 * x) * (1 + ·)
    if pre is not None and x in pre.inputs and ix.scalar(ix.other(pre, x)) == 0.5:
        return mul
    return None


def _fuse_gelu_erf(graph: Graph, ix: Index, erf: Node):
    """0.5 * x * (1 + erf(x / sqrt 2)) → Gelu."""
    scale = ix.producer(erf.inputs[0])
    if scale is None or scale.domain or scale.op not in ("Div", "Mul"):
        return None
    x, c = scale.inputs
    want = math.sqrt(2.0) if scale.op == "Div" else 1.0 / math.sqrt(2.0)
    if not _close(ix.scalar(c), want):
        return None
    last = _gelu_tail(graph, ix, erf, x)
    if last is None:
        return None
    return last, [Node("Gelu", (x,), last.outputs, {"approximate": "none"}, name=last.name or "gelu", version=20)]


def _fuse_gelu_tanh(graph: Graph, ix: Index, tanh: Node):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) → Gelu(approximate="tanh")."""
    outer = ix.producer(tanh.inputs[0], "Mul")
    if outer is None:
        return None
    inner_name = next((i for i in outer.inputs if _close(ix.scalar(ix.other(outer, i)), math.sqrt(2.0 / math.pi), 1e-3)), None)
    add = ix.producer(inner_name, "Add") if inner_name else None
    if add is None:
        return None
    for x in add.inputs:
        cube_term = ix.producer(ix.other(add, x), "Mul")
        if cube_term is None:
            continue
        for p in cube_term.inputs:
            pw = ix.producer(p, "Pow")
            if pw is not None and pw.inputs[0] == x and ix.scalar(pw.inputs[1]) == 3.0:
                if _close(ix.scalar(ix.other(cube_term, p)), 0.044715, 1e-3):
                    last = _gelu_tail(graph, ix, tanh, x)
                    if last is not None:
                        return last, [Node("Gelu", (x,), last.outputs, {"approximate": "tanh"}, name=last.name or "gelu", version=20)]
    return None


# ----------------------------------------------------------------------------- Dense


_ACTIVATION_OPS = {"Tanh": "tanh", "Relu": "relu"}


def dense_epilogue(graph: Graph, ix: Index, first: Node, n: int, bias: str | None = None) -> tuple[Node, str | None, str, str | None]:
    """What follows a matmul `first` with N = `n` output columns that a Dense epilogue can absorb:
    a bias Add (unless `first` has a bias), an activation, then a residual Add. Returns (the last
    node absorbed, bias, activation, residual)."""
    last = first
    rank = graph.info(first.outputs[0]).rank
    if bias is None:
        add = ix.only_consumer(last.outputs[0], "Add")
        if add is not None and _vector(graph, ix.other(add, last.outputs[0]), n, rank):
            last, bias = add, ix.other(add, last.outputs[0])
    activation = "none"
    act = ix.only_consumer(last.outputs[0])
    if act is not None and act.domain == "" and act.op == "Gelu":
        last, activation = act, "gelu" if act.attrs.get("approximate", "none") == "none" else "gelu_tanh"
    elif act is not None and act.domain == "" and act.op in _ACTIVATION_OPS:
        last, activation = act, _ACTIVATION_OPS[act.op]
    residual = None
    add = ix.only_consumer(last.outputs[0], "Add")
    if add is not None:
        other = ix.other(add, last.outputs[0])
        if graph.const(other) is None and graph.info(other).shape == graph.info(last.outputs[0]).shape:
            last, residual = add, other
    return last, bias, activation, residual


def _dense_epilogue(graph: Graph, ix: Index, first: Node, x: str, w: str, bias: str | None):
    """Grow a Dense from a MatMul/Gemm: absorb a bias Add, an activation, then a residual Add."""
    last, bias, activation, residual = dense_epilogue(graph, ix, first, graph.const(w).shape[1], bias)
    inputs = (x, w, _flat(graph, bias) if bias else "", residual or "")
    while inputs and not inputs[-1]:
        inputs = inputs[:-1]
    node = Node("Dense", inputs, last.outputs[:1], {"activation": activation}, name=first.name or "dense", domain=ENGINE_DOMAIN)
    return last, [node]


def _fuse_matmul(graph: Graph, ix: Index, mm: Node):
    x, w = mm.inputs
    wc = graph.const(w)
    xi = graph.info(x)
    if wc is None or wc.ndim != 2 or xi.rank is None or xi.rank < 2 or xi.dtype != np.float32 or wc.dtype != np.float32:
        return None
    return _dense_epilogue(graph, ix, mm, x, w, None)


def _fuse_gemm(graph: Graph, ix: Index, gemm: Node):
    a = gemm.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        return None
    x, w = gemm.inputs[:2]
    wc = graph.const(w)
    if wc is None or graph.info(x).dtype != np.float32:
        return None
    if a.get("transB", 0):
        w = graph.add_constant(graph.fresh_name(w + "_t"), np.ascontiguousarray(wc.T))
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 and gemm.inputs[2] else None
    if bias is not None and not _vector(graph, bias, graph.const(w).shape[1], 2):
        return None
    return _dense_epilogue(graph, ix, gemm, x, w, bias)


# ----------------------------------------------------------------------------- attention

_LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _walk_back(graph: Graph, ix: Index, name: str, stop_shape: tuple) -> tuple[str, float, list[Node]] | None:
    """Follow layout ops and scalar Mul/Div back from `name` to a tensor of `stop_shape`.
    Returns (source, product of scalar factors, the layout/scale nodes in execution order)."""
    chain: list[Node] = []
    scale = 1.0
    while graph.info(name).shape != stop_shape:
        p = ix.producer(name)
        if p is None or p.domain or len(ix.cons.get(name, [])) != 1:
            return None
        if p.op in _LAYOUT_OPS:
            name = p.inputs[0]
        elif p.op in ("Mul", "Div") and any(ix.scalar(i) is not None for i in p.inputs):
            c = next(i for i in p.inputs if ix.scalar(i) is not None)
            if p.op == "Div" and c != p.inputs[1]:
                return None
            scale = scale * ix.scalar(c) if p.op == "Mul" else scale / ix.scalar(c)
            name = ix.other(p, c)
        else:
            return None
        chain.insert(0, p)
    return name, scale, chain


def _probe(graph: Graph, chain: list[Node], src: str, start: np.ndarray) -> np.ndarray | None:
    """Run a chain of layout ops on an index array (scalar factors skipped) to see where each
    element of `src` ends up."""
    env = {src: start}
    for node in chain:
        if node.op in ("Mul", "Div"):
            var = next(i for i in node.inputs if i in env)
            env[node.outputs[0]] = env[var]
            continue
        fn = lookup_version(node.op, node.version, node.domain).fn
        try:
            env[node.outputs[0]] = fn(env[node.inputs[0]], *(graph.const(i) for i in node.inputs[1:]), **node.attrs)
        except (ValueError, TypeError):
            return None
    return env[chain[-1].outputs[0]] if chain else start


def _scores_operand(graph: Graph, ix: Index, add: Node, heads: int) -> str:
    """Which input of the mask Add carries the scores: the one with a head axis (the mask has
    size 1 there); with one head, the one computed by a MatMul or a scalar scale."""
    a, c = add.inputs
    sa, sc = graph.info(a).shape, graph.info(c).shape
    if heads > 1 and sa is not None and sc is not None and len(sa) == len(sc) == 4 and {sa[1], sc[1]} == {heads, 1}:
        return a if sa[1] == heads else c
    pa = ix.producer(a)
    return a if pa is not None and pa.op in ("MatMul", "Mul", "Div") else c


def _fuse_attention(graph: Graph, ix: Index, softmax: Node):
    """softmax(Q Kᵀ · scale + mask) V with head split/merge reshapes → Attention."""
    info = graph.info(softmax.inputs[0])
    if not info.is_static or info.rank != 4 or softmax.attrs.get("axis", -1) % 4 != 3 or softmax.version < 13:
        return None
    b, h, s, s2 = info.shape
    if s != s2:
        return None
    # scores: MatMul, then any of scalar Mul/Div and one additive mask, in either order
    name, scale, mask, scaled_after_mask = softmax.inputs[0], 1.0, None, False
    while True:
        p = ix.producer(name)
        if p is None or p.domain or len(ix.cons.get(name, [])) != 1:
            return None
        if p.op == "MatMul":
            break
        if p.op in ("Mul", "Div") and ix.scalar(p.inputs[1]) is not None:
            # walking backwards: a scale met before the mask Add is applied after it, to the mask too
            scaled_after_mask = scaled_after_mask or mask is None
            scale = scale * ix.scalar(p.inputs[1]) if p.op == "Mul" else scale / ix.scalar(p.inputs[1])
            name = p.inputs[0]
        elif p.op == "Add" and mask is None:
            if scaled_after_mask:
                return None  # (scores + mask) * c: the kernel adds the mask unscaled
            path = _scores_operand(graph, ix, p, h)
            mask = ix.other(p, path)
            mi = graph.info(mask)
            if mi.rank != 4 or mi.shape[1] != 1 or mi.shape[0] not in (1, b) or mi.shape[2] not in (1, s) or mi.shape[3] != s:
                return None
            name = path
        else:
            return None
    scores = p
    d_model = None
    qi = graph.info(scores.inputs[0])
    if qi.shape is None or len(qi.shape) != 4:
        return None
    d = qi.shape[3]
    d_model = h * d
    src_shape = (b, s, d_model)
    q = _walk_back(graph, ix, scores.inputs[0], src_shape)
    k = _walk_back(graph, ix, scores.inputs[1], src_shape)
    pv = ix.only_consumer(softmax.outputs[0], "MatMul")
    if q is None or k is None or pv is None or pv.inputs[0] != softmax.outputs[0]:
        return None
    v = _walk_back(graph, ix, pv.inputs[1], src_shape)
    if v is None or v[1] != 1.0:
        return None
    # the merge back to [b, s, h*d]
    out_chain, name = [], pv.outputs[0]
    while graph.info(name).shape != src_shape:
        c = ix.only_consumer(name)
        if c is None or c.domain or c.op not in _LAYOUT_OPS:
            return None
        out_chain.append(c)
        name = c.outputs[0]
    # check every chain really is the head split (or merge) by probing it with element indices
    idx = np.arange(b * s * d_model).reshape(src_shape)
    heads = idx.reshape(b, s, h, d).transpose(0, 2, 1, 3)
    expect = {"q": heads, "k": heads.transpose(0, 1, 3, 2), "v": heads}
    for key, (src, _, chain) in zip("qkv", (q, k, v)):
        got = _probe(graph, chain, src, idx)
        if got is None or got.shape != expect[key].shape or not np.array_equal(got, expect[key]):
            return None
    o_idx = np.arange(b * h * s * d).reshape(b, h, s, d)
    got = _probe(graph, out_chain, pv.outputs[0], o_idx)
    if got is None or not np.array_equal(got, o_idx.transpose(0, 2, 1, 3).reshape(src_shape)):
        return None
    last = out_chain[-1] if out_chain else pv
    inputs = (q[0], k[0], v[0]) + ((mask,) if mask else ())
    attrs = {"num_heads": int(h), "scale": float(scale * q[1] * k[1])}
    return last, [Node("Attention", inputs, last.outputs[:1], attrs, name=softmax.name or "attention", domain=ENGINE_DOMAIN)]


# ----------------------------------------------------------------------------- the passes


@function_pass("fuse_layernorm", opt_level=1, requires=("fold_constants",))
def fuse_layernorm(graph: Graph, ctx: PassContext) -> int:
    """The decomposed LayerNorm of opset < 17 exports → LayerNormalization."""
    return _rewrite(graph, {"Div": _fuse_layernorm})


@function_pass("fuse_gelu", opt_level=1, requires=("fold_constants",))
def fuse_gelu(graph: Graph, ctx: PassContext) -> int:
    """erf and tanh forms of GELU → Gelu."""
    return _rewrite(graph, {"Erf": _fuse_gelu_erf, "Tanh": _fuse_gelu_tanh})


@function_pass("fuse_dense", opt_level=1, requires=("fuse_gelu",))
def fuse_dense(graph: Graph, ctx: PassContext) -> int:
    """MatMul/Gemm with a constant weight (+ bias, + activation, + residual) → Dense."""
    return _rewrite(graph, {"MatMul": _fuse_matmul, "Gemm": _fuse_gemm})


@function_pass("fuse_attention", opt_level=2, requires=("fuse_dense",))
def fuse_attention(graph: Graph, ctx: PassContext) -> int:
    """Q Kᵀ · scale + mask → softmax → · V, with the head reshapes/transposes → Attention."""
    return _rewrite(graph, {"Softmax": _fuse_attention})


# ----------------------------------------------------------------------------- attention mask

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Not", "Neg", "Equal", "Less", "Greater", "And", "Or", "Expand", "Identity"}


def _query_constant(graph: Graph, ix: Index, name: str, memo: dict[str, bool]) -> bool:
    """Whether `name`, broadcast to the scores' [B, H, Sq, Sk], is the same for every query row:
    its second-to-last dim is 1, or it is computed elementwise (or expanded) from such values."""
    if name in memo:
        return memo[name]
    shape = graph.info(name).shape
    if shape is not None and (len(shape) < 2 or shape[-2] == 1):
        memo[name] = True
        return True
    p = ix.producer(name)
    ok = p is not None and p.domain == "" and p.op in _ELEMENTWISE
    if ok:
        data = p.inputs[:1] if p.op == "Expand" else [i for i in p.inputs if i]
        ok = all(_query_constant(graph, ix, i, memo) for i in data)
    memo[name] = ok
    return ok


@function_pass("narrow_attention_mask", opt_level=2, requires=("fuse_attention",))
def narrow_attention_mask(graph: Graph, ctx: PassContext) -> int:
    """Exporters expand the padding mask to [B, 1, S, S]; where it provably does not vary along
    the query axis, feed Attention its first query row [B, 1, 1, S] (what the kernel reads).
    Attentions that read the same mask (every layer of an encoder) share one Slice."""
    ix, memo, changed = Index(graph), {}, 0
    rows: dict[str, str] = {}  # mask -> its first query row
    for node in graph.nodes:
        if node.domain != ENGINE_DOMAIN or node.op != "Attention" or len(node.inputs) < 4:
            continue
        mask = node.inputs[3]
        shape = graph.info(mask).shape
        if shape is None or len(shape) != 4 or shape[2] == 1 or not _query_constant(graph, ix, mask, memo):
            continue
        if mask not in rows:
            consts = [
                graph.add_constant(graph.fresh_name(f"{mask}_{k}"), np.array([v], np.int64))
                for k, v in (("start", 0), ("end", 1), ("axis", 2))
            ]
            rows[mask] = row = graph.fresh_name(f"{mask}_row")
            sl = Node("Slice", (mask, *consts), (row,), name=f"{node.name}_mask_row", version=13)
            info = TensorInfo(graph.info(mask).dtype, shape[:2] + (1,) + shape[3:])
            graph.add_node(sl, [info], index=graph.nodes.index(graph.current(node)))
        graph.replace_node(node, node.replace(inputs=node.inputs[:3] + (rows[mask],)))
        changed += 1
    return changed


# ----------------------------------------------------------------------------- QKV projection


_PROJECTIONS = {"Dense": (2, 3), "QDense": (5, 6)}  # op → positions of its bias and residual inputs


def _input(node: Node, i: int) -> str:
    return node.inputs[i] if len(node.inputs) > i else ""


def _projection(graph: Graph, ix: Index, name: str, attention: Node) -> Node | None:
    """The Dense (or QDense) computing `name`, if it is a plain linear projection read only by `attention`."""
    p = ix.producer(name)
    if p is None or p.domain != ENGINE_DOMAIN or p.op not in _PROJECTIONS or p.attrs.get("activation", "none") != "none":
        return None
    if _input(p, _PROJECTIONS[p.op][1]):  # a residual
        return None
    users = ix.cons.get(name, [])
    return p if all(u is attention or u == attention for u in users) and name not in graph.outputs else None


@function_pass("merge_qkv", opt_level=2, requires=("fuse_attention",))
def merge_qkv(graph: Graph, ctx: PassContext) -> int:
    """Three Dense projections of one input feeding an Attention → one Dense over [Wq | Wk | Wv]
    (one large matmul instead of three; Attention reads Q, K and V at column offsets). Three
    QDense of one input quantized the same way (per tensor, or with equal static parameters)
    merge the same way, exactly: the quantized input is the same, and every column keeps its
    weight, scale and bias. When the queries have an input of their own (a classifier's last
    layer, whose queries `hoist_row_gather` narrowed to the rows read), K and V merge alone."""
    changed = 0
    for stale in graph.nodes:
        node = graph.current(stale)
        if node.domain != ENGINE_DOMAIN or node.op != "Attention" or node.attrs.get("hidden", 0):
            continue
        ix = Index(graph)
        dense = [_projection(graph, ix, name, node) for name in node.inputs[:3]]
        if any(d is None for d in dense) or len({id(d) for d in dense}) != 3:
            continue
        if len({d.inputs[0] for d in dense}) == 1:
            merged = _merge_projections(graph, dense, node)
            if merged is None:
                continue
            hidden = merged[1]
            inputs = (merged[0],) * 3
            offsets = dict(q_offset=0, k_offset=hidden, v_offset=2 * hidden)
        elif dense[1].inputs[0] == dense[2].inputs[0] != dense[0].inputs[0]:
            merged = _merge_projections(graph, dense[1:], node)
            if merged is None:
                continue
            hidden = merged[1]
            inputs = (node.inputs[0], merged[0], merged[0])
            offsets = dict(q_offset=0, k_offset=0, v_offset=hidden)
        else:
            continue
        attrs = dict(node.attrs, hidden=hidden, **offsets)
        graph.replace_node(node, node.replace(inputs=inputs + node.inputs[3:], attrs=attrs))
        changed += 1
    graph.remove_unused()
    return changed


def _merge_projections(graph: Graph, dense: list[Node], attention: Node) -> tuple[str, int] | None:
    """One Dense (or QDense) over the concatenated weights of projections of one input, added
    before `attention`: ``(its output, the width of one projection)``, or None if they differ."""
    op = dense[0].op
    if any(d.op != op for d in dense) or (op == "QDense" and not _same_input_quantization(graph, dense)):
        return None
    weights = [graph.const(d.inputs[1]) for d in dense]
    b = _PROJECTIONS[op][0]
    has_bias = [bool(_input(d, b)) for d in dense]
    if len({w.shape for w in weights}) != 1 or len({w.dtype for w in weights}) != 1 or len(set(has_bias)) != 1:
        return None
    hidden = weights[0].shape[1]
    tag = "qkv" if len(dense) == 3 else "kv"
    w = graph.add_constant(graph.fresh_name(f"{dense[0].inputs[1]}_{tag}"), np.concatenate(weights, axis=1))
    inputs = (dense[0].inputs[0], w)
    if op == "QDense":  # per-column weight scales, then the input's quantization (shared)
        scales = np.concatenate([graph.const(d.inputs[2]).reshape(-1) for d in dense])
        inputs += (graph.add_constant(graph.fresh_name(f"{dense[0].inputs[2]}_{tag}"), scales), _input(dense[0], 3), _input(dense[0], 4))
    if has_bias[0]:
        bias = np.concatenate([graph.const(d.inputs[b]).reshape(-1) for d in dense])
        inputs += (graph.add_constant(graph.fresh_name(f"{dense[0].inputs[b]}_{tag}"), bias),)
    while not inputs[-1]:
        inputs = inputs[:-1]
    out = graph.fresh_name(f"{dense[0].outputs[0]}_{tag}")
    x_info = graph.info(dense[0].inputs[0])
    default = "query" if tag == "qkv" else "key"
    fused = Node(op, inputs, (out,), {"activation": "none"}, name=f"{dense[0].name or default}_{tag}", domain=ENGINE_DOMAIN)
    width = len(dense) * hidden
    graph.add_node(fused, [TensorInfo(x_info.dtype, tuple(x_info.shape[:-1]) + (width,))], index=graph.nodes.index(attention))
    return out, hidden


def _same_input_quantization(graph: Graph, nodes: list[Node]) -> bool:
    """Whether QDense nodes quantize their input the same way: all per tensor at run time, or all
    with equal static scales and zero points, and have constant per-column weight scales."""
    if any(graph.const(n.inputs[2]) is None for n in nodes):
        return False
    if any(_input(n, i) and graph.const(_input(n, i)) is None for n in nodes for i in (3, 4)):
        return False
    params = [tuple(graph.const(_input(n, i)) if _input(n, i) else None for i in (3, 4)) for n in nodes]
    for p in params[1:]:
        for a, b in zip(params[0], p):
            if (a is None) != (b is None) or (a is not None and not (a.dtype == b.dtype and np.array_equal(a, b))):
                return False
    return True


# ----------------------------------------------------------------------------- embeddings


def _embedding_terms(graph: Graph, ix: Index, name: str, shape: tuple) -> list[tuple[str, ...]] | None:
    """The terms of the Add chain computing `name`, in the order it adds them: ((t0 + t1) + t2)...
    A term is ("gather", table, ids) for a Gather of a constant float32 [n, H] table (read only
    by the chain) or ("add", const) for a float32 constant that broadcasting does not widen."""
    p = ix.producer(name)
    if p is not None and p.op == "Add" and p.domain == "":
        a, b = p.inputs
        a_sum, b_sum = (_is_inner_add(ix, i) for i in (a, b))
        if a_sum and b_sum:
            return None  # (a + b) + (c + d) is not a left-to-right sum
        head, tail = (b, a) if b_sum else (a, b)  # float addition commutes exactly: a + b == b + a
        terms = _embedding_terms(graph, ix, head, shape) if a_sum or b_sum else _embedding_leaf(graph, ix, head, shape)
        leaf = _embedding_leaf(graph, ix, tail, shape)
        if terms is None or leaf is None:
            return None
        return terms + leaf
    return _embedding_leaf(graph, ix, name, shape)


def _is_inner_add(ix: Index, name: str) -> bool:
    p = ix.producer(name, "Add")
    return p is not None and ix.only_consumer(name) is not None


def _embedding_leaf(graph: Graph, ix: Index, name: str, shape: tuple) -> list[tuple[str, ...]] | None:
    c = graph.const(name)
    if c is not None:
        fits = c.ndim <= len(shape) and all(d in (1, s) for d, s in zip(c.shape[::-1], shape[::-1]))
        return [("add", name)] if fits and c.dtype == np.float32 else None
    g = ix.producer(name, "Gather")
    if g is None or ix.only_consumer(name) is None or graph.info(name).shape != shape:
        return None
    table, ids = g.inputs
    t = graph.const(table)
    if t is None or t.dtype != np.float32 or t.ndim != 2 or g.attrs.get("axis", 0) not in (0, -2):
        return None
    if graph.info(ids).dtype not in (np.int64, np.int32):
        return None
    return [("gather", table, ids)]


def _fuse_embedding(graph: Graph, ix: Index, ln: Node):
    """Gather(word, ids) [+ Gather(type, type_ids)] [+ positions] → LayerNormalization → Embedding."""
    x = ln.inputs[0]
    info = graph.info(x)
    if info.dtype != np.float32 or not info.is_static or info.rank is None or info.rank < 2:
        return None
    if ln.attrs.get("axis", -1) % info.rank != info.rank - 1 or any(o for o in ln.outputs[1:]):
        return None
    scale = ln.inputs[1]
    bias = ln.inputs[2] if len(ln.inputs) > 2 else ""
    if graph.const(scale) is None or (bias and graph.const(bias) is None) or ix.only_consumer(x) is None:
        return None
    terms = _embedding_terms(graph, ix, x, tuple(info.shape))
    if terms is None or not any(t[0] == "gather" for t in terms):
        return None
    inputs = (scale, bias) + tuple(i for t in terms for i in t[1:])
    attrs = {"terms": tuple(t[0] for t in terms), "epsilon": float(ln.attrs.get("epsilon", 1e-5))}
    return ln, [Node("Embedding", inputs, ln.outputs[:1], attrs, name=ln.name or "embedding", domain=ENGINE_DOMAIN)]


@function_pass("fuse_embedding", opt_level=2, requires=("fold_constants",))
def fuse_embedding(graph: Graph, ctx: PassContext) -> int:
    """Embedding lookups summed, then LayerNorm over the last axis → one Embedding op (one pass
    over each token's row instead of a Gather, an Add and the LayerNorm each touching all of it).
    Off with `pass_config={"fuse_embedding": False}`."""
    if not ctx.config.get("fuse_embedding", True):
        return 0
    return _rewrite(graph, {"LayerNormalization": _fuse_embedding})


# ----------------------------------------------------------------------------- the mask row

_MASK_OPS = _ELEMENTWISE | {"Unsqueeze", "Squeeze", "Slice"}


def _mask_subgraph(graph: Graph, ix: Index, name: str) -> tuple[str, list[Node]] | None:
    """The single graph input `name` is computed from, and the nodes computing it (in graph
    order), if they are all cheap elementwise or layout ops and every other input is a constant."""
    nodes: dict[int, Node] = {}
    sources: set[str] = set()
    todo = [name]
    while todo:
        v = todo.pop()
        if graph.const(v) is not None:
            continue
        if v in graph.inputs:
            sources.add(v)
            continue
        p = ix.producer(v)
        if p is None or p.domain != "" or p.op not in _MASK_OPS:
            return None
        if id(p) not in nodes:
            nodes[id(p)] = p
            todo.extend(i for i in p.inputs if i)
    if len(sources) != 1:
        return None
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    return sources.pop(), sorted(nodes.values(), key=lambda n: order[id(n)])


def _mask_probes(shape: tuple[int, int], dtype: np.dtype) -> list[np.ndarray]:
    """Masks that tell the mask formulas apart and pin down where each position goes: all ones,
    all zeros, a random 0/1 pattern, and unusual values (2, -1, huge) at shifting positions."""
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    odd = np.array([0, 1, 2, -1, 3, -7, 100, (1 << 24) + 1, info.max, info.min, 1 << 30, 5], dtype)
    n = int(np.prod(shape))
    probes = [np.ones(shape, dtype), np.zeros(shape, dtype), rng.integers(0, 2, shape).astype(dtype)]
    probes += [np.resize(np.roll(odd, k), n).reshape(shape) for k in range(len(odd))]
    return probes


def _run_nodes(graph: Graph, nodes: list[Node], feeds: dict[str, np.ndarray], out: str) -> np.ndarray | None:
    env = dict(feeds)
    for node in nodes:
        fn = lookup_version(node.op, node.version, node.domain).fn
        args = [env[i] if i in env else graph.const(i) if i else None for i in node.inputs]
        try:
            res = fn(*args, **node.attrs)
        except (ValueError, TypeError, IndexError, ArithmeticError):
            return None
        for o, r in zip(node.outputs, res if isinstance(res, tuple) else (res,)):
            env[o] = np.asarray(r)
    return env.get(out)


def _same_bits(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@function_pass("fuse_attention_mask_row", opt_level=2, requires=("fuse_attention",))
def fuse_attention_mask_row(graph: Graph, ctx: PassContext) -> int:
    """The chain exporters compute the additive mask row [B, 1, 1, S] with from the integer
    padding mask (Unsqueeze, Expand, Cast, 1 - m, Cast, Where or * big_negative, then the row
    Slice of `narrow_attention_mask`) → one AttentionMaskRow op. The chain must be elementwise
    and layout ops of that one input and constants; which formula it computes ("where" or
    "mul", with which constant) is found by running it and the candidates on probe masks
    (ones, zeros, random 0/1, odd values at every position): only an exact (bitwise) match on
    all of them is rewritten. Off with `pass_config={"fuse_attention_mask_row": False}`."""
    if not ctx.config.get("fuse_attention_mask_row", True):
        return 0
    ix, changed, seen = Index(graph), 0, set()
    for node in graph.nodes:
        if node.domain != ENGINE_DOMAIN or node.op != "Attention" or len(node.inputs) < 4 or node.inputs[3] in seen:
            continue
        row = node.inputs[3]
        seen.add(row)
        rewrite = _mask_row_node(graph, ix, row)
        if rewrite is not None:
            graph.replace_node(*rewrite)
            ix = Index(graph)
            changed += 1
    if changed:
        graph.remove_unused()
    return changed


def _mask_row_node(graph: Graph, ix: Index, row: str) -> tuple[Node, Node] | None:
    info = graph.info(row)
    producer = ix.producer(row)
    if producer is None or info.dtype != np.float32 or not info.is_static or info.rank != 4 or info.shape[1:3] != (1, 1):
        return None
    found = _mask_subgraph(graph, ix, row)
    if found is None:
        return None
    mask, nodes = found
    mi = graph.info(mask)
    if mi.dtype not in (np.int64, np.int32) or not mi.is_static or mi.rank != 2 or info.shape != (mi.shape[0], 1, 1, mi.shape[1]):
        return None
    consts = [c for n in nodes for i in n.inputs if (c := graph.const(i)) is not None and c.size == 1 and c.dtype.kind == "f"]
    constants = {float(c.reshape(-1)[0]) for c in consts} - {0.0, 1.0}
    probes = _mask_probes(mi.shape, mi.dtype)
    fn = lookup_version("AttentionMaskRow", 1, ENGINE_DOMAIN).fn
    with np.errstate(all="ignore"):  # the odd probe values overflow (1 - 2**62) * big: as they would at run time
        outs = [_run_nodes(graph, nodes, {mask: p}, row) for p in probes]
        matches = [
            (mode, value)
            for mode in ("where", "mul")
            for value in sorted(constants)
            if all(_same_bits(o, fn(p, mode=mode, value=value)) for o, p in zip(outs, probes))
        ]
    if not matches:
        return None
    attrs = {"mode": matches[0][0], "value": matches[0][1]}
    return producer, Node("AttentionMaskRow", (mask,), (row,), attrs, name=producer.name or "attention_mask_row", domain=ENGINE_DOMAIN)
