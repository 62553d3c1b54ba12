"""Write an int8 ONNX model: the chosen linear layers in onnxruntime's dynamic-quantization form.

Each chosen MatMul (or Gemm) becomes::

    xq, sx, zx = DynamicQuantizeLinear(x)          (one per input x, shared by Q, K and V)
    y = Mul(Cast(MatMulInteger(xq, Wq, zx), to=float), Mul(sx, sw))   [+ Add(bias) for a Gemm]

with `Wq` int8, symmetric per output channel, quantized as the engine's int8 kernel quantizes
weights (`kernels.int8.quantize_weight`: sw = max|W| / 127 per column, zero point 0). The file
runs on onnxruntime and any ONNX runtime with these standard ops, and the engine imports it back
onto its int8 kernel (`passes/quant_import.py`). The layer choice is the `quantize_int8` pass's
(`passes/quantize.py`): the graph is imported and fused to Dense nodes, selected with the same
code, and the chosen nodes are rewritten in the ModelProto.

This lives in `export` rather than beside `prune` in `passes`: it needs the kernel's weight
quantization, and passes do not import kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import import_onnx
from ..graph.onnx_importer import ModelLike, load_model_proto
from ..graph.shapes import bind_dims
from ..kernels.int8 import quantize_weight
from ..passes import PassContext, Sequential
from ..passes.cleanup import eliminate_dead_code, eliminate_noops, fold_constants
from ..passes.fusion import fuse_dense, fuse_gelu, fuse_layernorm
from ..passes.prune import _save
from ..passes.quantize import LAYER_SETS, chosen_dense, quantize_settings

MIN_OPSET = 11  # DynamicQuantizeLinear


def quantize(
    model: ModelLike,
    out: str | os.PathLike | None = None,
    layers: str | Sequence[str] = "encoder",
    exclude: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Quantize a model's linear layers to int8 and return (and with ``out``, write) the new ONNX model.

    - ``layers``: ``"encoder"`` (default: the Dense layers upstream of a LayerNormalization; the
      task head stays fp32), ``"all"``, or a list of regular expressions matched (``re.search``)
      against a layer's node, weight and bias names — the choice `Engine(quantize="int8")` makes.
    - ``exclude``: regular expressions matched the same way; a match stays fp32.
    - ``out``: the ``.onnx`` file to write (weights in ``<out>.data`` beside it past 2 GB); the
      source is never modified.

    Weights are symmetric int8 per output channel. Activations are quantized at run time **per
    tensor** (``DynamicQuantizeLinear``: one scale and zero point for the whole input of a layer,
    all tokens of all sequences), as onnxruntime's dynamic quantization does; `Engine(quantize=
    "int8")` on the fp32 model quantizes each row (token) on its own instead, which is more
    accurate and makes a row's result independent of the other rows. Both run on the same int8
    kernel. Raises ValueError for bad arguments or when no layer is selected.
    """
    config = _check_arguments(layers, exclude)
    proto, _ = load_model_proto(model)
    if isinstance(model, onnx.ModelProto):  # never modify the caller's proto
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(
            f"the model uses ONNX op-set {opset}; the int8 form needs DynamicQuantizeLinear (op-set {MIN_OPSET}): "
            f"re-export the model with opset ≥ {MIN_OPSET}"
        )
    chosen = _choose(proto, config)
    if not chosen:
        raise ValueError(
            f"no linear layer selected for int8 (layers={layers!r}, exclude={list(exclude or [])!r}): the model has no MatMul/Gemm with "
            "a constant float32 [K, N] weight there (an already quantized model?), or the patterns select none"
        )
    _rewrite(proto, chosen)
    if out is not None:
        _save(proto, Path(out), model)
    return proto


def _check_arguments(layers, exclude) -> dict:
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ValueError(
                f"layers must be one of {list(LAYER_SETS)} or a list of regular expressions matched against layer names, got {layers!r}"
            )
    elif not isinstance(layers, Sequence) or not layers or not all(isinstance(p, str) for p in layers):
        raise ValueError(f"layers must be 'encoder', 'all' or a non-empty list of regular expressions (strings), got {layers!r}")
    if isinstance(exclude, str):
        exclude = [exclude]
    if exclude is not None and (not isinstance(exclude, Sequence) or not all(isinstance(p, str) for p in exclude)):
        raise ValueError(f"exclude must be a list of regular expressions (strings), got {exclude!r}")
    config = {"quantize": "int8", "quantize_layers": layers if isinstance(layers, str) else list(layers), "quantize_exclude": exclude}
    try:
        quantize_settings(config)
    except ValueError as exc:  # the pass's message names its config keys: name the arguments instead
        msg = str(exc).replace("config['quantize_layers']", "layers").replace("config['quantize_exclude']", "exclude")
        raise ValueError(msg) from None
    return config


def _choose(proto: onnx.ModelProto, config: dict) -> dict[int, np.ndarray]:
    """Index of each chosen MatMul/Gemm node in `proto` → its float32 [K, N] weight (as the
    product uses it: a Gemm's transB is applied)."""
    nodes = proto.graph.node
    seen: dict[str, int] = {}
    for n in nodes:
        seen[n.name] = seen.get(n.name, 0) + 1
    renamed = {}  # a unique name for each MatMul/Gemm, so the Dense made from it leads back to it
    for i, n in enumerate(nodes):
        if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx") and (not n.name or seen[n.name] > 1):
            renamed[i] = n.name
            n.name = f"{n.op_type}__{i}"
    try:
        graph = import_onnx(proto)
    finally:
        for i, name in renamed.items():
            nodes[i].name = name
    by_name = {(f"{n.op_type}__{i}" if i in renamed else n.name): i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Gemm")}
    graph = bind_dims(graph, {n: tuple(d if isinstance(d, int) else 1 for d in graph.info(n).shape or ()) for n in graph.inputs})
    ctx = PassContext(config=config)
    Sequential([fold_constants, eliminate_noops, eliminate_dead_code, fuse_layernorm, fuse_gelu, fuse_dense])(graph, ctx)
    _, layer_set, exclude = quantize_settings(config)
    chosen = {}
    for node in chosen_dense(graph, layer_set, exclude):
        i = by_name.get(node.name)
        if i is not None:
            chosen[i] = graph.const(node.inputs[1])
    return chosen


class _Names:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        self.used |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _rewrite(proto: onnx.ModelProto, chosen: dict[int, np.ndarray]) -> None:
    graph = proto.graph
    fresh = _Names(graph)
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # x → (xq, scale, zero point)
    quantized_weights: dict[tuple, tuple[str, str]] = {}  # (weight, op, transB) → (int8 weight, scales): shared weights once
    new_nodes, new_inits = [], []
    for i, node in enumerate(graph.node):
        if i not in chosen:
            new_nodes.append(node)
            continue
        x, y, base = node.input[0], node.output[0], node.name or node.output[0]
        if x not in quantized_inputs:
            quantized_inputs[x] = (fresh(f"{x}_quantized"), fresh(f"{x}_scale"), fresh(f"{x}_zero_point"))
            new_nodes.append(
                helper.make_node("DynamicQuantizeLinear", [x], list(quantized_inputs[x]), name=fresh(f"{base}_quantize_input"))
            )
        xq, xs, xz = quantized_inputs[x]
        key = (node.input[1], node.op_type, any(a.name == "transB" and a.i for a in node.attribute))
        if key not in quantized_weights:
            wq, w_scale = quantize_weight(chosen[i])
            quantized_weights[key] = fresh(f"{node.input[1]}_int8"), fresh(f"{node.input[1]}_scale")
            new_inits += [
                numpy_helper.from_array(wq, quantized_weights[key][0]),
                numpy_helper.from_array(w_scale, quantized_weights[key][1]),
            ]
        wname, sname = quantized_weights[key]
        scales, acc, accf = fresh(f"{base}_scales"), fresh(f"{y}_int32"), fresh(f"{y}_float")
        product = fresh(f"{y}_matmul") if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else y
        new_nodes += [
            helper.make_node("Mul", [xs, sname], [scales], name=fresh(f"{base}_scales_mul")),
            helper.make_node("MatMulInteger", [xq, wname, xz], [acc], name=fresh(f"{base}_int8")),
            helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT, name=fresh(f"{base}_cast")),
            helper.make_node("Mul", [accf, scales], [product], name=fresh(f"{base}_dequantize")),
        ]
        if product != y:  # a Gemm's bias (alpha = beta = 1: the only Gemm the Dense fusion takes)
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [y], name=fresh(f"{base}_bias")))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused(graph)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers nothing reads any more (the fp32 weights replaced)."""
    live = {o.name for o in graph.output} | {i for n in graph.node for g in _subgraphs(n) for i in _subgraph_inputs(g)}
    keep = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output) or not node.output:
            keep.append(node)
            live.update(node.input)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(reversed(keep))
    unused = [t for t in graph.initializer if t.name not in live]
    for t in unused:
        graph.initializer.remove(t)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [
        g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs
    ]


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph (If / Loop body) reads from the outer scope, conservatively: all it reads."""
    names = {i for n in g.node for i in n.input}
    for n in g.node:
        for sub in _subgraphs(n):
            names |= _subgraph_inputs(sub)
    return names


__all__ = ["quantize"]
