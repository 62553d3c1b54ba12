"""Choose which Dense layers run in int8, and record the choice on the node.

Enabled by `PassContext(config={"quantize": "int8"})`. A chosen Dense node gets the attribute
`quantize="int8"`; its weight stays a float32 constant in the IR, so the reference semantics do
not change (the reference `dense` ignores the attribute, as it ignores `layout`) and the planner
quantizes and packs the weight for the int8 kernel: symmetric per output channel, with the input
rows quantized at run time (dynamic, per row, uint8 with a zero point; see
`sparseinfer.kernels.int8`). The Attention nodes get `quantize="int8"` too (their two products
run in int8, the softmax in fp32; `config["quantize_attention"] = False` keeps them fp32).
LayerNorm, softmax and everything else stay fp32.

Which Dense layers, `config["quantize_layers"]`:

* `"encoder"` (the default): every Dense upstream of a LayerNormalization — the attention
  projections and feed-forward layers of every encoder layer. Dense layers after the last
  LayerNorm are task heads (pooler, classifier, QA span head) and stay fp32: they are a small part
  of the work (the pooler and the sequence classifier see one token per sequence) and their
  outputs are the logits, so their error is not averaged away by later layers. A graph without a
  LayerNormalization has no recognisable encoder: every Dense counts as one.
* `"all"`: every Dense with a constant float32 [K, N] weight, heads included (as DeepSparse
  quantizes every linear layer).
* a list of regular expressions: the Dense layers one of which matches (`re.search`) the node's
  name or the name of its weight or bias (exporters name the bias after the module, e.g.
  `bert.encoder.layer.0.attention.output.dense.bias`, when the weight is `onnx::MatMul_315`).

`config["quantize_exclude"]`: regular expressions matched the same way; a match stays fp32.

Sparse weights: the sparse int8 kernel (`sparseinfer.kernels.int8_sparse`) stores a weight as its
nonzero 4 x 1 blocks (4 consecutive k of one output column, the unit of the int8 dot product) and
beats the dense int8 kernel below a block density (`INT8_SPARSE_MAX_BLOCK_DENSITY`). A quantized
node whose weight has at most that fraction of nonzero 4 x 1 blocks (`block_density_4x1`, any
sparsity pattern: an unstructured weight just has more of them) gets `layout="bsr"`,
`block=[4, 1]`; any other quantized node gets `layout="dense"`, whatever the layout pass chose for
fp32 (int8 takes precedence, and the node says how its weight is really stored). Override the
threshold with `config["quantize_sparse_max_density"]` (0 keeps every quantized weight dense); a
weight the sparsity config pins to "dense" (or `{"layout": "dense"}` for all) stays dense; exclude
a weight from int8 to keep its sparse fp32 kernel. Run this pass after `choose_sparse_layouts`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..graph import Graph, Node
from ..graph.reference import ENGINE_DOMAIN
from .manager import PassContext, function_pass
from .sparsity import SparsityConfig

SCHEMES = ("int8",)
LAYER_SETS = ("encoder", "all")
# Highest fraction of nonzero 4 x 1 blocks at which a quantized weight is stored sparse. Measured
# by benchmarks/sparse_int8_breakeven.py (benchmarks/results/sparse_int8_breakeven.md: BERT-base
# shapes, M = 128, Zen 5 with VNNI): the sparse int8 kernel beats the dense int8 step (quantize_rows
# + dense_int8_packed) below 0.59-0.60 of the blocks for a whole layer, 0.56-0.65 per shape, at 1
# and 2 threads, for 4x1-block and unstructured masks alike (the work is the number of blocks);
# at M = 1024 (`--m 1024`, 2 threads) below 0.53-0.55, 0.51-0.61 per shape. 0.5 leaves a margin
# for other shapes and machines: at 0.5 the sparse kernel was 1.0-1.2x faster.
INT8_SPARSE_MAX_BLOCK_DENSITY = 0.5
INT8_SPARSE_BLOCK = [4, 1]
# Whether the attention's two products (Q K^T and softmax V) run in int8 too (the softmax stays
# fp32; see kernels/attention_int8.py): 1.6x the fp32 attention kernel at BERT-base batch 1, seq 128
# (0.139 -> 0.087 ms per layer, 2 threads; 2.2-3x the previous fp32 kernel). It
# did not measurably change the int8 model's accuracy, whose error comes from the Dense layers
# (`benchmarks/bench_int8.py`): BERT-base (random weights, 8 x 128 tokens) max logit error 2.19%
# of the range with it, 2.34% without (onnxruntime's dynamic int8: 2.99%). These figures move
# with any change of rounding in either attention kernel (which int8 step an activation falls on
# moves with it: they were 1.56% and 1.73% with the previous kernels); all-MiniLM-L6-v2
# embeddings vs fp32, cosine min 0.9986.
QUANTIZE_ATTENTION = True


def block_density_4x1(w: np.ndarray) -> float:
    """Fraction of the 4 x 1 blocks of a [K, N] weight (4 consecutive k of one column; K zero padded
    to a multiple of 4) that hold a nonzero: the sparse int8 kernel's work relative to dense."""
    k, n = w.shape
    if not w.size:
        return 1.0
    g = -(-k // 4)
    nonzero = np.zeros((4 * g, n), bool)
    nonzero[:k] = w != 0
    return float(nonzero.reshape(g, 4, n).any(axis=1).mean())


def _sparse_limits(ctx: PassContext) -> tuple[float, set[str]]:
    """The block density below which a quantized weight is stored sparse (0: never), and the
    weights the sparsity config pins to "dense"."""
    limit = ctx.config.get("quantize_sparse_max_density", INT8_SPARSE_MAX_BLOCK_DENSITY)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0.0 <= limit <= 1.0:
        raise ValueError(f"config['quantize_sparse_max_density'] must be a number in [0, 1] (a fraction of 4x1 blocks), got {limit!r}")
    cfg = SparsityConfig.from_context(ctx)
    dense = {w for w, pin in cfg.per_weight.items() if (pin if isinstance(pin, str) else pin[0]) == "dense"}
    return (0.0 if cfg.layout == "dense" else float(limit)), dense


def _patterns(value, key: str) -> list[re.Pattern]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"config[{key!r}] must be a list of regular expressions (strings), got {value!r}")
    compiled = []
    for p in value:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"config[{key!r}]: {p!r} is not a valid regular expression ({exc})") from None
    return compiled


def quantize_settings(config: dict) -> tuple[str | None, str | list[re.Pattern], list[re.Pattern]]:
    """`(scheme, layers, exclude)` from a pass config, checked: scheme is None (off) or "int8";
    layers is "encoder", "all" or compiled patterns; exclude is compiled patterns."""
    scheme = config.get("quantize")
    if scheme in (None, False, "none"):
        return None, "encoder", []
    if scheme not in SCHEMES:
        raise ValueError(f"config['quantize'] must be None, 'none' or one of {list(SCHEMES)}, got {scheme!r}")
    layers = config.get("quantize_layers")
    if layers is None:
        layers = "encoder"
    elif isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ValueError(
                f"config['quantize_layers'] must be one of {list(LAYER_SETS)} or a list of regular expressions "
                f"matched against Dense node, weight and bias names, got {layers!r}"
            )
    else:
        layers = _patterns(layers, "quantize_layers")
    exclude = _patterns(config.get("quantize_exclude") or [], "quantize_exclude")
    return scheme, layers, exclude


def _names(node: Node) -> list[str]:
    """What a layer pattern is matched against: the node's name, its weight's and its bias's."""
    return [n for n in (node.name, *node.inputs[1:3]) if n]


def encoder_dense(graph: Graph) -> set[str]:
    """Output names of the Dense nodes upstream of some LayerNormalization (all Dense nodes if the
    graph has none): the encoder, as opposed to the task heads after the last LayerNorm."""
    dense = {n.outputs[0] for n in graph.nodes if n.domain == ENGINE_DOMAIN and n.op == "Dense"}
    todo = [i for n in graph.nodes if n.domain == "" and n.op == "LayerNormalization" for i in n.inputs if i]
    if not todo:
        return dense
    producer = {o: n for n in graph.nodes for o in n.outputs if o}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producer:
            todo.extend(i for i in producer[name].inputs if i and i not in seen)
    return dense & seen


def chosen_dense(graph: Graph, layers: str | list[re.Pattern], exclude: list[re.Pattern]) -> list[Node]:
    """The Dense nodes with a quantizable weight that `layers` and `exclude` (as checked by
    `quantize_settings`) select, in graph order."""
    encoder = encoder_dense(graph) if layers == "encoder" else None
    chosen = []
    for node in graph.nodes:
        if node.domain != ENGINE_DOMAIN or node.op != "Dense" or not _quantizable(graph, node):
            continue
        names = _names(node)
        if encoder is not None:
            selected = node.outputs[0] in encoder
        elif layers == "all":
            selected = True
        else:
            selected = any(p.search(n) for p in layers for n in names)
        if selected and not any(p.search(n) for p in exclude for n in names):
            chosen.append(node)
    return chosen


def _quantizable(graph: Graph, node: Node) -> bool:
    w = graph.const(node.inputs[1])
    return w is not None and w.dtype == np.float32 and w.ndim == 2 and bool(np.isfinite(w).all())


@function_pass("quantize_int8", opt_level=2, requires=("fuse_dense",))
def quantize_dense(graph: Graph, ctx: PassContext) -> int:
    """Mark the selected Dense nodes `quantize="int8"` (see the module docstring for which)."""
    scheme, layers, exclude = quantize_settings(ctx.config)
    if scheme is None:
        return 0
    limit, pinned_dense = _sparse_limits(ctx)
    changed = 0
    for node in chosen_dense(graph, layers, exclude):
        attrs = dict(node.attrs, quantize=scheme)
        if limit > 0 and node.inputs[1] not in pinned_dense and block_density_4x1(graph.const(node.inputs[1])) <= limit:
            attrs.update(layout="bsr", block=list(INT8_SPARSE_BLOCK))
        elif attrs.get("layout", "dense") != "dense":
            attrs.update(layout="dense", block=[])
        if attrs != node.attrs:
            graph.replace_node(node, node.replace(attrs=attrs))
            changed += 1
    if _quantize_attention(ctx.config):
        for stale in graph.nodes:
            node = graph.current(stale)
            if node.domain == ENGINE_DOMAIN and node.op == "Attention" and node.attrs.get("quantize") != scheme:
                graph.replace_node(node, node.replace(attrs=dict(node.attrs, quantize=scheme)))
                changed += 1
    return changed


def _quantize_attention(config: dict) -> bool:
    value = config.get("quantize_attention", QUANTIZE_ATTENTION)
    if not isinstance(value, bool):
        raise ValueError(f"config['quantize_attention'] must be True or False, got {value!r}")
    return value
