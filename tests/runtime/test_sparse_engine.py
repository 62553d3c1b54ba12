"""Pruned models through the Engine's sparse kernels equal onnxruntime on the same pruned file."""

import numpy as np
import onnxruntime as ort
import pytest

import sparseinfer
from sparseinfer import Engine
from sparseinfer.kernels.csr import FEW_ROWS
from sparseinfer.runtime.plan import Plan
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.tolerances import MODEL_ATOL, MODEL_RTOL

CASES = [
    ("bert-sequence-classification/model.onnx", 0.9, None, "csr"),
    ("bert-token-classification/model.onnx", 0.9, (1, 4), "bsr"),
    ("distilbert-question-answering/model.onnx", 0.7, (4, 4), "bsr"),
    ("roberta-sequence-classification/model-opset14.onnx", 0.95, None, "csr"),
    ("bert-question-answering/model.onnx", 1 - 1 / 1024, (1, 8), "bsr"),  # almost all-zero weights
]


@pytest.mark.parametrize("path, sparsity, block, layout", CASES)
def test_pruned_model_matches_onnxruntime(path, sparsity, block, layout):
    pruned = sparseinfer.prune(FIXTURES / path, sparsity=sparsity, block=block)
    engine = Engine(pruned, num_threads=1)
    chosen = {r["layout"] for r in engine.describe()}
    assert layout in chosen, chosen
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 1), (2, 9), (3, 40)]:
        feeds = make_inputs(manifest_entry(path), batch, seq, seed=seq)
        kinds = {s.kind for s in engine.plan(feeds).steps if s.node.op == "Dense"}
        assert kinds == {"kernel"}
        for a, b in zip(engine.run(feeds), session.run(None, feeds)):
            np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL)


def test_describe_reports_savings_for_sparse_weights():
    engine = Engine(sparseinfer.prune(FIXTURES / "bert-sequence-classification", sparsity=0.9, block=(1, 4)), num_threads=1)
    rows = [r for r in engine.describe() if r["layout"] == "bsr"]
    # pruning rounds to whole blocks per weight (461 of 512 blocks of a 32x64 weight is 0.9004)
    assert rows and all(r["block"] == (1, 4) and abs(r["flops_saved"] - 0.9) <= 0.005 for r in rows)


@pytest.mark.parametrize(
    "path, block",
    [("bert-sequence-classification/model.onnx", None), ("bert-token-classification/model.onnx", (1, 4))],
)
def test_feature_major_plan_matches_onnxruntime_and_the_row_major_plan(path, block):
    # the plan keeps the residual stream and the feed-forward intermediate feature-major between
    # the sparse steps (runtime/feature_major.py) and gives what onnxruntime gives on the pruned file
    pruned = sparseinfer.prune(FIXTURES / path, sparsity=0.9, block=block)
    engine = Engine(pruned, num_threads=2)
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 1), (2, 9), (3, 40)]:
        feeds = make_inputs(manifest_entry(path), batch, seq, seed=seq)
        plan = engine.plan(feeds)
        ff1 = [st.node for st in plan.steps if st.node.op == "Dense" and st.node.attrs.get("activation") == "gelu"]
        assert len(ff1) == 2  # one per encoder layer
        for node in ff1:  # CSR on at most FEW_ROWS rows runs row-major: layer 0 has every token,
            # the last layer one row per sequence (the classifier reads token 0)
            rows = int(np.prod(plan.graph.info(node.inputs[0]).shape[:-1]))
            assert (node.outputs[0] in plan.feature_major) == (block is not None or rows > FEW_ROWS)
        ours = engine.run(feeds)
        row_major = Plan(plan.graph, chain_sparse=False).run(feeds)
        for a, b, u in zip(ours, session.run(None, feeds), row_major):
            np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL)
            np.testing.assert_allclose(a, u, atol=1e-5, rtol=1e-5)  # the LayerNorms sum in another order
        profile = engine.profile(feeds)
        assert len(profile) == len(plan.steps) and all(r["kind"] == "kernel" for r in profile if r["op"] == "Dense")
