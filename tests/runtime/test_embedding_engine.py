"""The Embedding and AttentionMaskRow kernel steps through Engine.run: bit-identical to the
unfused steps on every fixture, onnxruntime's outputs, and a clear error for a bad token id."""

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from sparseinfer import Engine
from tests.conftest import FIXTURES, make_inputs, manifest_entry, model_ids
from tests.passes.builders import node, onnx_graph
from tests.tolerances import MODEL_ATOL, MODEL_RTOL, tolerance

OFF = {"fuse_embedding": False, "fuse_attention_mask_row": False}


@pytest.mark.parametrize("path", model_ids())
def test_fused_steps_change_no_output_bit(path):
    feeds = make_inputs(manifest_entry(path), 3, 13, seed=2)
    feeds["input_ids"][0, 1] = -feeds["input_ids"][0, 1]  # ONNX Gather: a negative id counts from the end
    fused, plain = Engine(FIXTURES / path), Engine(FIXTURES / path, pass_config=OFF)
    steps = {(r["op"], r["kind"]) for r in fused.profile(feeds)}
    assert {("Embedding", "kernel"), ("AttentionMaskRow", "kernel")} <= steps, steps
    assert not {op for op, _ in steps} & {"Expand", "Where", "Slice"}, steps
    got = fused.run(feeds)
    for a, b in zip(got, plain.run(feeds)):
        np.testing.assert_array_equal(a, b)
    theirs = ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(got, theirs):
        np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL)


@pytest.mark.parametrize("bad", [100_000, -100_000])
def test_token_id_out_of_range_is_a_clear_error(bad):
    path = "bert-sequence-classification/model.onnx"
    engine = Engine(FIXTURES / path)
    feeds = make_inputs(manifest_entry(path), 2, 6)
    engine.run(feeds)
    feeds["input_ids"][1, 3] = bad
    with pytest.raises(IndexError, match=rf"index {bad} is out of range for an axis of size \d+ \(input 'input_ids'"):
        engine.run(feeds)


def test_mask_values_other_than_zero_and_one_follow_the_formula():
    path = "distilbert-question-answering/model.onnx"
    feeds = make_inputs(manifest_entry(path), 2, 9, seed=4)
    feeds["attention_mask"][1] = [1, 2, 0, -1, 1, 1, 3, 0, 1]
    for a, b in zip(Engine(FIXTURES / path).run(feeds), Engine(FIXTURES / path, pass_config=OFF).run(feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pos_shape", [(1, 4, 8), (4, 8), (8,), (1, 1, 8), (3, 1, 8), (3, 4, 8), (3, 4, 1)])
def test_constant_addends_of_any_broadcast_shape(pos_shape):
    """The planner turns a constant addend into a table and row indices; every broadcast works."""
    rng = np.random.default_rng(0)
    inits = {
        "word": rng.standard_normal((20, 8)).astype(np.float32),
        "pos": rng.standard_normal(pos_shape).astype(np.float32),
        "gamma": rng.standard_normal(8).astype(np.float32),
        "beta": rng.standard_normal(8).astype(np.float32),
    }
    nodes = [
        node("Gather", ["word", "ids"], ["w"]),
        node("Add", ["pos", "w"], ["sum"]),
        node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
    ]
    graph = onnx_graph(nodes, {"ids": [3, 4]}, ["y"], inits, input_dtypes={"ids": TensorProto.INT64})
    feeds = {"ids": rng.integers(-20, 20, (3, 4)).astype(np.int64)}
    fused = Engine(graph)
    assert [r["op"] for r in fused.profile(feeds)] == ["Embedding"]
    np.testing.assert_array_equal(fused.run(feeds)[0], Engine(graph, pass_config=OFF).run(feeds)[0])


COLD_START = r"""
import json, sys
import numpy as np
from sparseinfer import Engine
from sparseinfer.kernels import embedding
engine = Engine(sys.argv[1])
ids = np.random.default_rng(0).integers(5, 300, (2, 9))
out = engine.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})[0]
kernels = {"embedding": embedding.embedding_layernorm, "mask_row": embedding.attention_mask_row}
stats = {k: (sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())) for k, f in kernels.items()}
print(json.dumps({"out": out.tolist(), "stats": stats}))
"""


@pytest.mark.slow
def test_second_process_loads_the_kernels_from_the_cache(tmp_path):
    """cache=True on a parallel kernel taking tuples of arrays: a warm start compiles nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))

    def run():
        proc = subprocess.run([sys.executable, "-c", COLD_START, str(FIXTURES / "bert-sequence-classification")], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    for name, (hits, misses) in cold["stats"].items():
        assert misses > 0 and hits == 0, f"{name}: an empty cache must compile ({hits} hits, {misses} misses)"
    for name, (hits, misses) in warm["stats"].items():
        assert hits > 0 and misses == 0, f"{name}: a warm cache must not compile ({hits} hits, {misses} misses)"
    assert warm["out"] == cold["out"]


def test_more_terms_than_the_kernel_takes_run_on_the_reference():
    """Five embedding terms: the pass fuses them, the planner leaves the node to its reference."""
    rng = np.random.default_rng(1)
    inits = {f"t{k}": rng.standard_normal((6, 8)).astype(np.float32) for k in range(5)}
    inits |= {"gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)}
    nodes = [node("Gather", [f"t{k}", "ids"], [f"g{k}"]) for k in range(5)]
    nodes += [node("Add", ["g0", "g1"], ["s1"])] + [node("Add", [f"s{k}", f"g{k + 1}"], [f"s{k + 1}"]) for k in range(1, 4)]
    nodes += [node("LayerNormalization", ["s4", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    graph = onnx_graph(nodes, {"ids": [2, 3]}, ["y"], inits, input_dtypes={"ids": TensorProto.INT64})
    feeds = {"ids": rng.integers(0, 6, (2, 3)).astype(np.int64)}
    fused = Engine(graph)
    assert [(r["op"], r["kind"]) for r in fused.profile(feeds)] == [("Embedding", "reference")]
    np.testing.assert_allclose(fused.run(feeds)[0], Engine(graph, pass_config=OFF).run(feeds)[0], **tolerance("layernorm"))
