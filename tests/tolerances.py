"""Tolerances, stated once. Integer (int8/int32) paths are compared exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Whole-model parity against onnxruntime (fp32): the bound.
MODEL_ATOL = 1e-4
MODEL_RTOL = 1e-3


@dataclass(frozen=True)
class Tol:
    """rtol, and an atol that grows like sqrt(k) when the kernel sums k products: fp32 rounding
    errors of a length-k dot product of O(1) terms with random signs grow like sqrt(k)."""

    rtol: float
    atol: float
    per_sqrt_k: bool = False

    def __call__(self, k: int = 1) -> dict[str, float]:
        atol = self.atol * max(1.0, math.sqrt(k)) if self.per_sqrt_k else self.atol
        return {"rtol": self.rtol, "atol": atol}


# Numba kernels (fp32 arithmetic) against the float64 NumPy reference in sparseinfer/graph/reference.py,
# per (kernel, dtype). Why each bound is what it is:
KERNEL_TOL: dict[tuple[str, np.dtype], Tol] = {
    # fp32 FMA accumulation over K (the only fastmath flag is `contract`); k = K.
    ("dense", np.dtype(np.float32)): Tol(rtol=1e-4, atol=1e-4, per_sqrt_k=True),
    # Q·Kᵀ sums over D, then P·V over S keys with P in [0, 1]; fp32 softmax with the Cephes exp
    # (2 ulp) and a reassociated row sum; k = D (the longer, O(1)-term reduction).
    ("attention", np.dtype(np.float32)): Tol(rtol=1e-4, atol=1e-4, per_sqrt_k=True),
    # two-pass mean / variance with fp32 (reassociated) row sums, scaled by gamma ~ N(0, 1).
    ("layernorm", np.dtype(np.float32)): Tol(rtol=1e-4, atol=1e-4),
    # the rational fp32 erf: 4.2e-7 absolute error evaluated in fp32.
    ("gelu", np.dtype(np.float32)): Tol(rtol=1e-5, atol=1e-6),
    # libm erf in float64, rounded once to fp32.
    ("gelu_exact", np.dtype(np.float32)): Tol(rtol=1e-6, atol=1e-7),
    # Cephes expf: at most ~2 ulp relative to float64 exp on [-87.3, 88.7].
    ("exp", np.dtype(np.float32)): Tol(rtol=3e-7, atol=0.0),
    # A compiled Plan (a chain of the fp32 kernels above, two encoder layers) against the reference
    # executor on the same optimised graph: the kernel errors compound through the layers.
    ("plan", np.dtype(np.float32)): Tol(rtol=1e-4, atol=1e-4),
}


def tolerance(kernel: str, dtype=np.float32, k: int = 1) -> dict[str, float]:
    """`rtol` / `atol` keyword arguments for np.testing.assert_allclose."""
    return KERNEL_TOL[(kernel, np.dtype(dtype))](k)


# Sparse matmul kernels (CSR / BSR): fp32 FMA accumulation over the nonzeros of a column (at most
# K of them, in K order; only `contract`), as the dense kernel; k = K.
KERNEL_TOL[("csr", np.dtype(np.float32))] = Tol(rtol=1e-4, atol=1e-4, per_sqrt_k=True)
KERNEL_TOL[("bsr", np.dtype(np.float32))] = Tol(rtol=1e-4, atol=1e-4, per_sqrt_k=True)

# Task pipelines against the Hugging Face pipelines (tests/fixtures/hf_outputs, torch fp32): label
# scores and embedding values agree to an absolute HF_ATOL (fp32 encoders whose kernels sum in another
# order; the softmax / sigmoid / pooling on top adds no error worth naming); labels and their order
# must be equal; embeddings also need a cosine similarity of at least HF_EMBEDDING_MIN_COSINE.
HF_ATOL = 2e-3
HF_EMBEDDING_MIN_COSINE = 0.9999

# The int8 Dense kernel (sparseinfer/kernels/int8.py) against the float64 reference Dense on the
# same dequantized operands (x_d = (xq - zp) * scale_x per row, w_d = Wq * scale_w per column): the
# integer accumulation is exact; the kernel rounds three times before the bias (int32 -> float32,
# scale_x * scale_w, the product: <= 3 * 2^-24 relative to z = x_d @ w_d), then adds the bias,
# applies the activation (the fp32 rational GELU: 4.2e-7 absolute) and adds the residual (one
# rounding each). Bound per element, relative to the terms (the result can cancel to ~0):
#     |out - ref| <= INT8_RTOL * (|z| + |bias| + |residual|) + INT8_ATOL
INT8_RTOL = 5e-7
INT8_ATOL = 1e-6
# A whole model with its encoder Dense layers in int8 against onnxruntime fp32 on the original file:
# max |int8 - fp32| of each output, as a fraction of the fp32 output's range (max - min). This is
# quantization error, not rounding error: measured 0.4-1.5 % on the fixtures (up to 2 % with the heads too).
INT8_MODEL_MAX_DIFF_OF_RANGE = 0.05
# int8 vs fp32 sentence embeddings (mean pooling + L2 normalisation) of a real checkpoint: a sanity
# floor on the cosine similarity; the measured values are in the test's message.
INT8_EMBEDDING_MIN_COSINE = 0.95
# A quantized model file (onnxruntime's dynamic, QDQ or QOperator form, or one sparseinfer.quantize
# wrote) on our Engine against onnxruntime on the same file, max |ours - theirs| as a fraction of
# the output's range. Both compute the same integer products from the same integer weights and
# scales; they differ only in the float32 rounding of the fp32 parts (LayerNorm, attention, GELU:
# ~1e-6 relative). Mostly that is all (measured: 0 to 2e-5 absolute on logits of range ~100), but
# where a value lands within that rounding of a half step of a later per-tensor quantization, it
# rounds the other way and the outputs move by about one quantization step (measured up to 1.0 %
# of the range, RoBERTa's classification head). The model's whole int8 error is 1-2 % of the range.
INT8_FILE_MAX_DIFF_OF_RANGE = 0.03
# A model written by sparseinfer.quantize (encoder linears int8, activations quantized per tensor by
# DynamicQuantizeLinear) run by onnxruntime, against the fp32 model on onnxruntime: max |int8 - fp32|
# as a fraction of the fp32 output's range. Quantization error: measured 0.7-1.7 % on the fixtures.
INT8_PER_TENSOR_MODEL_MAX_DIFF_OF_RANGE = 0.05
