"""sparseinfer: a sparse inference engine for BERT-family transformer models, in Python with Numba.

import sparseinfer
engine = sparseinfer.Engine("model.onnx")
logits, = engine(inputs)
"""

from ._numba_target import configure as _configure_numba

_configure_numba()  # before anything imports numba: 512-bit vectors on every AVX-512 CPU

from .export.int8_model import quantize  # noqa: E402
from .graph import ModelLoadError, UnsupportedOpError, import_onnx  # noqa: E402
from .passes.prune import prune, weight_sparsity  # noqa: E402
from .runtime import Engine, InputError  # noqa: E402
from .tasks import Pipeline  # noqa: E402

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
