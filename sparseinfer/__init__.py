"""sparseinfer: a sparse inference engine for BERT-family transformer models, in Python with Numba.

import sparseinfer
engine = sparseinfer.Engine("model.onnx")
logits, = engine(inputs)
"""

from .export.int8_model import quantize
from .graph import ModelLoadError, UnsupportedOpError, import_onnx
from .passes.prune import prune, weight_sparsity
from .runtime import Engine, InputError
from .tasks import Pipeline

__version__ = "0.1.0.dev0"

__all__ = [
    "Engine",
    "InputError",
    "Pipeline",
    "ModelLoadError",
    "UnsupportedOpError",
    "import_onnx",
    "prune",
    "quantize",
    "weight_sparsity",
    "__version__",
]
