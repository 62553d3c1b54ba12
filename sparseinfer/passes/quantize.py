"""Choose which Dense layers run in int8, and record the choice on the node.

Enabled by `PassContext(config={"quantize": "int8"})`. A chosen Dense node gets the attribute
`quantize="int8"`; its weight stays a float32 constant in the IR, so the reference semantics do
not change (the reference `dense` ignores the attribute, as it ignores `layout`) and the planner
quantizes and packs the weight for the int8 kernel: symmetric per output channel, with the input
rows quantized at run time (dynamic, per row, uint8 with a zero point; see
`sparseinfer.kernels.int8`). LayerNorm, softmax, attention and everything else stay fp32.

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

There is no sparse int8 kernel: a node the layout pass chose CSR or BSR for gets `layout="dense"`
when it is quantized (int8 takes precedence, and the node says how its weight is really stored);
exclude a weight to keep its sparse fp32 kernel. Run this pass after `choose_sparse_layouts`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..graph import Graph, Node
from ..graph.reference import ENGINE_DOMAIN
from .manager import PassContext, function_pass

SCHEMES = ("int8",)
LAYER_SETS = ("encoder", "all")


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


def _quantizable(graph: Graph, node: Node) -> bool:
    w = graph.const(node.inputs[1])
    return w is not None and w.dtype == np.float32 and w.ndim == 2 and bool(np.isfinite(w).all())


@function_pass("quantize_int8", opt_level=2, requires=("fuse_dense",))
def quantize_dense(graph: Graph, ctx: PassContext) -> int:
    """Mark the selected Dense nodes `quantize="int8"` (see the module docstring for which)."""
    scheme, layers, exclude = quantize_settings(ctx.config)
    if scheme is None:
        return 0
    encoder = encoder_dense(graph) if layers == "encoder" else None
    changed = 0
    for stale in graph.nodes:
        node = graph.current(stale)
        if node.domain != ENGINE_DOMAIN or node.op != "Dense" or not _quantizable(graph, node):
            continue
        names = _names(node)
        if encoder is not None:
            chosen = node.outputs[0] in encoder
        elif layers == "all":
            chosen = True
        else:
            chosen = any(p.search(n) for p in layers for n in names)
        if not chosen or any(p.search(n) for p in exclude for n in names):
            continue
        attrs = dict(node.attrs, quantize=scheme)
        if attrs.get("layout", "dense") != "dense":
            attrs.update(layout="dense", block=[])
        if attrs != node.attrs:
            graph.replace_node(node, node.replace(attrs=attrs))
            changed += 1
    return changed
