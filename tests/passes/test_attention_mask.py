"""narrow_attention_mask: feeds Attention one query row of the mask only where that is exact."""

import numpy as np
import onnxruntime as ort
import pytest

from sparseinfer.graph import import_onnx, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, default_pipeline, narrow_attention_mask
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.tolerances import MODEL_ATOL, MODEL_RTOL

from .builders import assert_same_outputs, optimize
from .test_fusion import ATTENTION_PASSES, attention_feeds, attention_graph


def _masks(graph):
    return [graph.info(n.inputs[3]).shape for n in graph.nodes if n.domain == ENGINE_DOMAIN and n.op == "Attention"]


@pytest.mark.parametrize("path", ["bert-sequence-classification/model.onnx", "roberta-question-answering/model-opset14.onnx"])
def test_exported_padding_mask_is_narrowed_and_outputs_match_onnxruntime(path):
    """Exporters expand the [B, S] padding mask to [B, 1, S, S] through Unsqueeze/Expand/Cast/Sub/Where:
    constant along the query axis, so Attention gets [B, 1, 1, S]."""
    graph = bind_dims(
        import_onnx(FIXTURES / path),
        {n: (3, 11) for n in ("input_ids", "attention_mask", "token_type_ids") if n in manifest_entry(path)["inputs"]},
    )
    default_pipeline()(graph, PassContext(config={"fuse_attention_mask_row": False}))  # which would replace the Slice
    assert _masks(graph) == [(3, 1, 1, 11)] * 2
    assert graph.op_counts()["Slice"] == 1  # both layers read the one narrowed row
    assert len({n.inputs[3] for n in graph.nodes if n.op == "Attention"}) == 1
    feeds = make_inputs(manifest_entry(path), 3, 11)
    expected = ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(run_graph(graph, feeds), expected):
        np.testing.assert_allclose(a, b, atol=MODEL_ATOL, rtol=MODEL_RTOL)


@pytest.mark.parametrize("mask", ["full", "shared"])
def test_a_mask_that_may_vary_per_query_row_is_left_alone(mask):
    """A [B, 1, S, S] (or [1, 1, S, S]) graph input may differ per query row (e.g. a causal mask)."""
    graph = attention_graph("torchscript", "div", mask)
    before = optimize(graph, *ATTENTION_PASSES)
    after = optimize(graph, *ATTENTION_PASSES, narrow_attention_mask)
    assert _masks(after) == _masks(before)
    assert "Slice" not in after.op_counts()
    assert_same_outputs(before, after, attention_feeds(before))


def test_a_key_mask_is_already_narrow():
    graph = attention_graph("torchscript", "div", "key")
    before = optimize(graph, *ATTENTION_PASSES)
    after = optimize(graph, *ATTENTION_PASSES, narrow_attention_mask)
    assert after.op_counts() == before.op_counts()
