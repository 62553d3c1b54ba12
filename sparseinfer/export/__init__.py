"""Turning checkpoints into ONNX models the engine runs, without torch.

`from_huggingface(dir)` builds the ONNX graph of a Hugging Face BERT / DistilBERT / RoBERTa
checkpoint (config.json + .safetensors) directly from its weights; `load_safetensors` is the
NumPy reader it uses. `quantize(model, out=...)` (also `sparseinfer.quantize`) writes an int8
ONNX model in onnxruntime's dynamic-quantization form.
"""

from .huggingface import SUPPORTED_MODEL_TYPES, TASKS, ExportError, from_huggingface
from .int8_model import quantize
from .safetensors import SafetensorsError, load_safetensors, read_safetensors_header

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TASKS",
    "ExportError",
    "SafetensorsError",
    "from_huggingface",
    "load_safetensors",
    "quantize",
    "read_safetensors_header",
]
