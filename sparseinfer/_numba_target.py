"""Have Numba compile the kernels for 512-bit vectors on every CPU with AVX-512.

LLVM tunes some Intel cores (client and server parts from Ice Lake on, and hosts it names
``rocketlake`` or ``sapphirerapids``) to *prefer* 256-bit vectors even though they have AVX-512:
its target feature ``prefer-256-bit``, meant to avoid the clock drop of 512-bit code on older
Xeons.  The kernels of this package are register-tiled for sixteen 512-bit registers (the CSR
and block kernels keep a 128-lane column in 8 zmm; see :mod:`sparseinfer.kernels.csr`); compiled
for 256 bits, every FMA of that loop becomes two.  Measured on an Intel Xeon (Sapphire Rapids,
2 cores, numba 0.68.1), BERT-base at batch 1, sequence 128, against dense onnxruntime in the
same run: 90% unstructured 3.01x -> 3.53x, 90% in 1 x 4 blocks 3.54x -> 4.85x; one CSR nonzero
(a 128-lane row held in L1) 2.9 -> 2.2 ns.  On a CPU whose tuning does not prefer 256 bits the
setting changes nothing.

Numba builds its LLVM target machine once, when it is imported, from ``NUMBA_CPU_FEATURES``
(default: the host's features).  :func:`configure` therefore sets that variable, before
``sparseinfer`` imports Numba, to the host's features plus ``-prefer-256-bit``.  It changes
nothing when

* the host has no AVX-512 (there is no wider vector to prefer);
* the user chose a target (``NUMBA_CPU_FEATURES``, ``NUMBA_CPU_NAME`` or ``NUMBA_ENABLE_AVX`` is
  set): their choice stands; setting ``NUMBA_CPU_FEATURES`` to the host's features keeps
  LLVM's own preference;
* Numba was imported before ``sparseinfer``: its target machine exists and cannot change, so a
  :class:`PerformanceWarning` says what to do (import ``sparseinfer`` first).

Numba keys its on-disk cache by the features, so kernels cached for one setting are never loaded
for the other.  The variable is inherited by child processes, which then compile the same code.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping

USER_SETTINGS = ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "NUMBA_ENABLE_AVX")
NO_256_PREFERENCE = "-prefer-256-bit"


class PerformanceWarning(UserWarning):
    """The kernels will run, but slower than they could on this machine."""


def target_features(host: Mapping[str, bool], flat: str, environ: Mapping[str, str]) -> str | None:
    """The ``NUMBA_CPU_FEATURES`` to set, or None to leave Numba's default alone.

    ``host`` maps LLVM feature names to whether the host has them, ``flat`` is the same as
    LLVM's feature string (``+avx512f,...``), ``environ`` the process environment.
    """
    if any(name in environ for name in USER_SETTINGS):
        return None
    if not host.get("avx512f", False):
        return None
    return f"{flat},{NO_256_PREFERENCE}" if flat else NO_256_PREFERENCE


def configure() -> str | None:
    """Set ``NUMBA_CPU_FEATURES`` for 512-bit vectors if it applies (see the module docstring).

    Returns the value set, or None.  Call before anything imports Numba.
    """
    import llvmlite.binding as llvm  # llvmlite alone does not build Numba's target machine

    try:
        host = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot read this CPU's features: Numba then uses none either
        return None
    value = target_features(host, host.flatten(), os.environ)
    if value is None:
        return None
    if "numba" in sys.modules:
        warnings.warn(
            "numba was imported before sparseinfer, so its kernels are compiled with LLVM's default "
            "preference for 256-bit vectors on this CPU, which has AVX-512 (the sparse kernels run up to "
            "~1.4x slower). Import sparseinfer before numba, or set NUMBA_CPU_FEATURES before starting "
            "Python (see sparseinfer._numba_target).",
            PerformanceWarning,
            stacklevel=2,
        )
        return None
    os.environ["NUMBA_CPU_FEATURES"] = value
    return value
