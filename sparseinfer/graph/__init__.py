"""The IR and its front door: ONNX importer, shape inference, and the NumPy reference semantics."""

from . import reference  # noqa: F401  (registers every op)
from .ir import Graph, GraphError, Node, TensorInfo, Value
from .onnx_importer import ModelLoadError, import_onnx
from .reference import ReferenceExecutor, run_graph
from .registry import UnsupportedOpError, supported_ops
from .shapes import ShapeError, infer_shapes

__all__ = [
    "Graph",
    "GraphError",
    "Node",
    "TensorInfo",
    "Value",
    "ModelLoadError",
    "import_onnx",
    "ReferenceExecutor",
    "run_graph",
    "UnsupportedOpError",
    "supported_ops",
    "ShapeError",
    "infer_shapes",
]
