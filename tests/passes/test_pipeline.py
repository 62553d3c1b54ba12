"""The default pipeline on every exported fixture model: each encoder layer's attention becomes
one Attention node, no decomposed LayerNorm / GELU / MatMul is left, and the optimised graph on the
NumPy reference executor gives onnxruntime's outputs on the original file."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from sparseinfer.graph import import_onnx, run_graph
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, default_pipeline
from tests.conftest import FIXTURES, MANIFEST, make_inputs, manifest_entry, model_ids
from tests.tolerances import MODEL_ATOL, MODEL_RTOL

BATCH, SEQ = 2, 9
NUM_LAYERS = json.loads((FIXTURES / "manifest.json").read_text())["generator"]["num_layers"]  # 2
UNFUSED = ("Softmax", "Erf", "ReduceMean", "MatMul")


def optimized(path: str, ctx: PassContext):
    """The fixture imported, bound to (BATCH, SEQ) and run through the default pipeline."""
    entry = manifest_entry(path)
    feeds = make_inputs(entry, BATCH, SEQ, seed=11)
    graph = bind_dims(import_onnx(FIXTURES / path), {k: v.shape for k, v in feeds.items()})
    default_pipeline()(graph, ctx)
    return graph, feeds


def assert_matches_onnxruntime(path: str, graph, feeds) -> None:
    session = ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, feeds)
    ours = run_graph(graph, feeds)
    assert graph.outputs == [o.name for o in session.get_outputs()]
    for name, a, b in zip(graph.outputs, ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL, err_msg=f"{path} {name}")


@pytest.mark.parametrize("path", model_ids())
def test_default_pipeline_fuses_every_layer_and_keeps_outputs(path):
    ctx = PassContext(validate=True)
    graph, feeds = optimized(path, ctx)
    counts = graph.op_counts()
    assert counts.get("Attention", 0) == NUM_LAYERS, counts
    assert not [op for op in UNFUSED if op in counts], counts
    assert counts.get("LayerNormalization", 0) == 2 * NUM_LAYERS, counts  # 2 per layer
    assert counts.get("Embedding", 0) == 1, counts  # the embeddings' lookups, sum and LayerNorm
    gelu_dense = [n for n in graph.nodes if n.op == "Dense" and n.attrs["activation"] == "gelu"]
    assert len(gelu_dense) == NUM_LAYERS  # the intermediate projection absorbed its GELU
    assert "fuse_attention" in ctx.ran
    assert_matches_onnxruntime(path, graph, feeds)


@pytest.mark.parametrize("path", model_ids())
def test_opt_level_one_leaves_attention_unfused(path):
    """fuse_attention is opt_level 2: at 1 the softmax stays, the rest is still fused and exact."""
    ctx = PassContext(opt_level=1, validate=True)
    graph, feeds = optimized(path, ctx)
    counts = graph.op_counts()
    assert "Attention" not in counts and counts.get("Softmax", 0) == NUM_LAYERS, counts
    assert "fuse_attention" not in ctx.ran
    assert "Erf" not in counts and "ReduceMean" not in counts
    assert_matches_onnxruntime(path, graph, feeds)


def test_manifest_lists_both_exporters():
    """The pipeline tests cover TorchScript and dynamo exports, opset 14 (decomposed LayerNorm) and 17+."""
    assert {m["exporter"] for m in MANIFEST} >= {"torchscript", "dynamo"}
    assert {m["opset"] for m in MANIFEST} >= {14, 17}
