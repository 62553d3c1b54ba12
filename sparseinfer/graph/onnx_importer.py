"""ONNX → Graph.

Accepts a ModelProto, a path to an `.onnx` file (external-data files beside it are read), or a
directory holding `model.onnx`. Initializers become constants; every node is checked against the
op registry at the model's op-set, and older op-set forms are canonicalised (an `axes`, `split`,
`starts`… attribute becomes a constant input) so that passes see one form per op.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .ir import Graph, GraphError, Node, TensorInfo
from .registry import UnsupportedOpError, lookup, normalize_domain

ModelLike = onnx.ModelProto | str | os.PathLike


class ModelLoadError(ValueError):
    """The model file could not be read or is not a usable ONNX model."""


# Attributes that later op-sets turned into inputs: op → [(attribute, input index, dtype)].
_ATTR_TO_INPUT = {
    "Squeeze": [("axes", 1, np.int64)],
    "Unsqueeze": [("axes", 1, np.int64)],
    "Split": [("split", 1, np.int64)],
    "Slice": [("starts", 1, np.int64), ("ends", 2, np.int64), ("axes", 3, np.int64)],
    "Clip": [("min", 1, None), ("max", 2, None)],  # None: the dtype of input 0
    **{
        r: [("axes", 1, np.int64)]
        for r in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")
    },
}
# Attributes holding an ONNX element type, stored in the IR as a numpy dtype.
_DTYPE_ATTRS = {"to", "output_dtype", "dtype"}


def _dtype(elem_type: int) -> np.dtype | None:
    if elem_type == onnx.TensorProto.UNDEFINED:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError, AttributeError):
        dtype = None
    if dtype is None or dtype.isbuiltin != 1:  # float8/int4/bfloat16 map to ml_dtypes' extension types
        raise UnsupportedOpError(f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} is not supported")
    return dtype


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedOpError(f"value {vi.name!r} is not a tensor (sequences, maps and optionals are not supported)")
    shape = None
    if t.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return TensorInfo(_dtype(t.elem_type), shape)


def _attr_value(attr: onnx.AttributeProto, where: str):
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise UnsupportedOpError(f"{where}: attribute {attr.name!r} holds a subgraph; control flow (If/Loop/Scan) is not supported")
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        raise UnsupportedOpError(f"{where}: sparse-tensor attribute {attr.name!r} is not supported")
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    if attr.name in _DTYPE_ATTRS and isinstance(value, int):
        return _dtype(value) if value else 0
    return value


def load_model_proto(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """Read a ModelProto from a proto, file or directory; returns it and its directory (if any)."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.onnx"))
            hint = f" It holds {', '.join(found)}: pass one of them." if found else ""
            raise ModelLoadError(f"directory {str(path)!r} has no model.onnx.{hint}")
        path = candidate
    if not path.is_file():
        raise ModelLoadError(f"no ONNX model at {str(path)!r}: the path does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends carry no useful text for users
        raise ModelLoadError(
            f"could not parse {str(path)!r} as an ONNX model ({type(exc).__name__}: {exc}). "
            "The file may be truncated, corrupt, or not an ONNX file; re-export or re-download it."
        ) from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{str(path)!r} parsed, but holds no ONNX graph or op-set: it is not an ONNX model (or is truncated)")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{str(path)!r} refers to external weight data that could not be read: {exc}") from None
    return proto, path.parent


def import_onnx(model: ModelLike, input_shapes: Mapping[str, Sequence[int | str | None]] | None = None) -> Graph:
    """Lower an ONNX model to a Graph. `input_shapes` overrides (some of) the graph inputs' shapes."""
    proto, _ = load_model_proto(model)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    opsets = {normalize_domain(o.domain): o.version for o in proto.opset_import}
    opset = opsets.get("", 0)
    if not opset:
        raise ModelLoadError("the model does not import the default ONNX op-set (ai.onnx)")
    g = proto.graph
    graph = Graph(g.name or "graph", opset)

    init_names = set()
    for init in g.initializer:
        try:
            graph.add_constant(init.name, numpy_helper.to_array(init))
        except (ValueError, TypeError, OSError) as exc:
            raise ModelLoadError(f"initializer {init.name!r} could not be read ({exc}); the file may be truncated") from None
        init_names.add(init.name)
    for sparse in g.sparse_initializer:
        raise UnsupportedOpError(f"sparse initializer {sparse.values.name!r} is not supported; store weights as dense tensors")

    overrides = dict(input_shapes or {})
    for vi in g.input:
        if vi.name in init_names:  # old exporters list initializers as inputs too
            continue
        info = _tensor_info(vi)
        if vi.name in overrides:
            info = _override_shape(vi.name, info, overrides.pop(vi.name))
        graph.add_input(vi.name, info)
    if overrides:
        raise ValueError(f"input_shapes names {sorted(overrides)}, which are not inputs of the model; its inputs are {graph.inputs}")

    declared = {vi.name: vi for vi in list(g.output) + list(g.value_info)}
    for i, onode in enumerate(g.node):
        domain = normalize_domain(onode.domain)
        where = f"node {onode.name or i!r} ({onode.op_type})"
        node_opset = opsets.get(domain)
        if node_opset is None:
            raise ModelLoadError(f"{where}: domain {onode.domain!r} is not imported by the model")
        opdef = lookup(onode.op_type, node_opset, domain, where=f"node {onode.name or i!r}")
        attrs = {a.name: _attr_value(a, where) for a in onode.attribute}
        inputs = list(onode.input)
        while inputs and not inputs[-1]:
            inputs.pop()
        inputs = _canonicalise(graph, onode, attrs, inputs)
        _check_attrs(opdef, attrs, where)
        opdef.check_arity(len(inputs), where)
        if onode.op_type == "Split" and len(inputs) < 2 and "num_outputs" not in attrs:
            attrs["num_outputs"] = len(onode.output)  # "split equally into as many outputs as there are"
        node = Node(onode.op_type, tuple(inputs), tuple(onode.output), attrs, onode.name, domain, opdef.since)
        infos = [_tensor_info(declared[o]) if o in declared else TensorInfo(None) for o in onode.output]
        try:
            graph.add_node(node, infos)
        except GraphError as exc:
            raise ModelLoadError(f"{where}: {exc}") from None
    for vi in g.output:
        if vi.name not in graph.values:
            raise ModelLoadError(f"graph output {vi.name!r} is produced by no node: the model is incomplete or truncated")
        graph.add_output(vi.name)
    try:
        graph.validate()
    except GraphError as exc:
        raise ModelLoadError(f"the model's graph is not well formed: {exc}. The file may be truncated or hand-edited wrongly") from None
    from .shapes import infer_shapes  # local import: shapes imports the registry too

    infer_shapes(graph)
    return graph


def _override_shape(name: str, info: TensorInfo, shape: Sequence[int | str | None]) -> TensorInfo:
    shape = tuple(shape)
    if info.shape is not None and len(shape) != len(info.shape):
        raise ValueError(
            f"input_shapes[{name!r}] = {shape} has rank {len(shape)}, but the model's input has rank {len(info.shape)} ({info})"
        )
    for d, old in zip(shape, info.shape or shape):
        if isinstance(d, int) and isinstance(old, int) and d != old:
            raise ValueError(f"input_shapes[{name!r}] = {shape} conflicts with the model's fixed shape {info.shape}")
        if isinstance(d, int) and d < 0:
            raise ValueError(f"input_shapes[{name!r}] = {shape} has a negative dimension")
    return TensorInfo(info.dtype, shape)


def _canonicalise(graph: Graph, onode: onnx.NodeProto, attrs: dict, inputs: list[str]) -> list[str]:
    """Move attributes that later op-sets made inputs into constant inputs (one IR form per op)."""
    for attr, index, dtype in _ATTR_TO_INPUT.get(onode.op_type, ()):
        if attr not in attrs:
            continue
        if dtype is None:
            src = graph.values.get(inputs[0])
            dtype = src.info.dtype if src is not None and src.info.dtype is not None else np.float32
        while len(inputs) < index:
            inputs.append("")
        const = graph.add_constant(graph.fresh_name(f"{onode.name or onode.op_type}_{attr}"), np.array(attrs.pop(attr), dtype=dtype))
        if len(inputs) == index:
            inputs.append(const)
        else:
            inputs[index] = const
    return inputs


def _check_attrs(opdef, attrs: dict, where: str) -> None:
    unknown = sorted(set(attrs) - set(opdef.attrs))
    if unknown:
        raise UnsupportedOpError(
            f"{where}: attribute(s) {unknown} not supported for {opdef.op} (opset ≥ {opdef.since}); known: {sorted(opdef.attrs)}"
        )
    missing = sorted(k for k, v in opdef.attrs.items() if v is inspect.Parameter.empty and k not in attrs)
    if missing:
        raise ModelLoadError(f"{where}: required attribute(s) {missing} are missing")
