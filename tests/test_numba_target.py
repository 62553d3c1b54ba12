"""The compile target sparseinfer asks of Numba (sparseinfer/_numba_target.py).

The oracle for the host is LLVM's own reading of its features (llvmlite), the same source Numba
uses; the import-order cases run in fresh interpreters, since Numba fixes its target once per
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import llvmlite.binding as llvm
import pytest

from sparseinfer._numba_target import NO_256_PREFERENCE, USER_SETTINGS, target_features

HOST = llvm.get_host_cpu_features()
HAS_AVX512 = bool(HOST.get("avx512f", False))

# prints what the child saw: the variable after importing sparseinfer, and whether a float32
# loop compiled by numba uses 512-bit registers
PROBE = """
import json, os, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    {imports}
import numba, numpy as np

@numba.njit(fastmath=True)
def axpy(a, x, y):
    for i in range(x.shape[0]):
        y[i] += a * x[i]

x = np.ones(1024, np.float32)
axpy(np.float32(2.0), x, x.copy())
asm = "".join(axpy.inspect_asm().values())
print(json.dumps({{
    "features": os.environ.get("NUMBA_CPU_FEATURES"),
    "zmm": "zmm" in asm,
    "warnings": [type(w.message).__name__ for w in caught],
}}))
"""


def run_probe(imports: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    clean.update(env)
    code = PROBE.format(imports=imports)
    done = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_avx512_host_drops_the_256_bit_preference():
    assert target_features({"avx512f": True, "avx2": True}, "+avx2,+avx512f", {}) == "+avx2,+avx512f," + NO_256_PREFERENCE


def test_no_avx512_no_change():
    assert target_features({"avx512f": False, "avx2": True}, "+avx2,-avx512f", {}) is None
    assert target_features({"avx2": True}, "+avx2", {}) is None


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_a_target_the_user_chose_stands(name):
    assert target_features({"avx512f": True}, "+avx512f", {name: "x"}) is None


def test_importing_sparseinfer_first_sets_the_target():
    seen = run_probe("import sparseinfer")
    assert seen["warnings"] == []
    assert seen["features"] == target_features(HOST, HOST.flatten(), {})
    # the effect, on this host: an AVX-512 CPU gets 512-bit code, any other keeps its own
    assert seen["zmm"] == HAS_AVX512


def test_numba_imported_first_keeps_its_target_and_warns():
    seen = run_probe("import numba; import sparseinfer")
    assert seen["features"] is None
    assert seen["warnings"] == (["PerformanceWarning"] if HAS_AVX512 else [])


def test_the_users_features_are_kept():
    flat = HOST.flatten()
    seen = run_probe("import sparseinfer", NUMBA_CPU_FEATURES=flat)
    assert seen["features"] == flat
    assert seen["warnings"] == []
