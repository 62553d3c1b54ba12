"""Kernels are compiled once and then loaded from Numba's on-disk cache (cache=True): a second
process with the same cache directory compiles nothing and gives the same answers. (Start-up
times are measured by benchmarks/bench_bert.py; tests never assert wall-clock time.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES

SCRIPT = r"""
import json, sys
import numpy as np
from sparseinfer import Engine
from sparseinfer.kernels import attention, dense, elementwise, norm
engine = Engine(sys.argv[1])
rng = np.random.default_rng(0)
ids = rng.integers(5, 300, (2, 9))
out = engine.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})[0]
kernels = {"dense": dense.dense_packed, "attention": attention.attention_packed, "layernorm": norm.layernorm_packed}
stats = {k: (sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())) for k, f in kernels.items()}
print(json.dumps({"out": out.tolist(), "stats": stats}))
"""


@pytest.mark.slow
def test_second_process_loads_every_kernel_from_the_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    model = str(FIXTURES / "bert-sequence-classification")

    def run():
        proc = subprocess.run([sys.executable, "-c", SCRIPT, model], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    for name, (hits, misses) in cold["stats"].items():
        assert misses > 0 and hits == 0, f"{name}: an empty cache must compile ({hits} hits, {misses} misses)"
    for name, (hits, misses) in warm["stats"].items():
        assert hits > 0 and misses == 0, f"{name}: a warm cache must not compile ({hits} hits, {misses} misses)"
    assert warm["out"] == cold["out"]
