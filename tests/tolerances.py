"""Tolerances, stated once. Integer (int8/int32) paths are compared exactly."""

# Whole-model parity against onnxruntime (fp32): the bound.
MODEL_ATOL = 1e-4
MODEL_RTOL = 1e-3
