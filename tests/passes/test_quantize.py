"""The int8 selection pass: which Dense nodes it marks `quantize="int8"` (encoder by default,
heads stay fp32; "all"; name patterns; exclusions), that it is off unless asked, that bad settings
are clear errors, and that marking changes nothing on the reference executor."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer.graph import Graph, Node, TensorInfo, import_onnx, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, PassError, default_pipeline
from sparseinfer.passes.quantize import INT8_SPARSE_MAX_BLOCK_DENSITY, block_density_4x1, encoder_dense, quantize_dense
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.passes.builders import structure

BATCH, SEQ = 2, 7
SEQ_CLS = "bert-sequence-classification/model.onnx"  # 2 layers x (QKV, out, intermediate, output) + pooler + classifier
DYNAMO = "bert-sequence-classification/model-dynamo-opset18.onnx"  # node names carry no module path; bias names do
HEADS = {"bert.pooler.dense.bias", "classifier.bias"}


def optimised(path: str = SEQ_CLS, **config) -> tuple[Graph, PassContext, dict]:
    """A fixture bound to (BATCH, SEQ) and optimised by the default pipeline, and the context it ran in."""
    feeds = make_inputs(manifest_entry(path), BATCH, SEQ, seed=4)
    graph = bind_dims(import_onnx(FIXTURES / path), {k: v.shape for k, v in feeds.items()})
    ctx = PassContext(validate=True, config=config, disabled={"quantize_int8"})  # the pass under test runs alone, after
    default_pipeline()(graph, ctx)
    return graph, ctx, feeds


def quantized(path: str = SEQ_CLS, **config) -> tuple[Graph, Graph, dict]:
    """(the optimised graph, a copy after the quantize pass with `config`, feeds)."""
    graph, ctx, feeds = optimised(path, **config)
    after = graph.copy()
    quantize_dense(after, ctx)
    return graph, after, feeds


def dense(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.domain == ENGINE_DOMAIN and n.op == "Dense"]


def marked_biases(graph: Graph) -> set[str]:
    """Each marked Dense by its bias name (the exporter's module path)."""
    return {n.inputs[2] for n in dense(graph) if n.attrs.get("quantize") == "int8"}


def test_default_marks_the_encoder_dense_layers_and_keeps_the_heads_fp32():
    before, after, feeds = quantized(quantize="int8")
    nodes = dense(after)
    # two layers of QKV (the last one's queries on their own: the classifier reads one row, see
    # hoist_row_gather, and K and V merged), attention output, FF1, FF2; pooler and classifier
    assert len(nodes) == 11
    heads = [n for n in nodes if n.inputs[2] in HEADS]
    encoder = [n for n in nodes if n.inputs[2] not in HEADS]
    assert len(encoder) == 9 and all(n.attrs["quantize"] == "int8" for n in encoder)
    assert all("quantize" not in n.attrs for n in heads)
    # only the attribute changed: same nodes, same order, same other attributes
    for b, a in zip(dense(before), nodes):
        assert {k: v for k, v in a.attrs.items() if k != "quantize"} == b.attrs
    assert [(n.op, n.inputs, n.outputs) for n in before.nodes] == [(n.op, n.inputs, n.outputs) for n in after.nodes]
    # the reference ignores the attribute, so the outputs are bit-identical
    for x, y in zip(run_graph(before, feeds), run_graph(after, feeds)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("path", ["distilbert-token-classification/model.onnx", "roberta-question-answering/model.onnx"])
def test_encoder_is_every_dense_upstream_of_a_layernorm(path):
    _, after, _ = quantized(path, quantize="int8")
    nodes = dense(after)
    last = nodes[-1]  # token classifier / QA span head, after the last LayerNorm
    assert "quantize" not in last.attrs
    assert all(n.attrs.get("quantize") == "int8" for n in nodes[:-1]) and len(nodes) == 9


def test_a_graph_without_layernorm_is_all_encoder():
    g = Graph("no-layernorm")
    g.add_input("x", TensorInfo(np.float32, (3, 4)))
    g.add_constant("w", np.ones((4, 4), np.float32))
    g.add_node(Node("Dense", ("x", "w"), ("h",), {"activation": "relu"}, domain=ENGINE_DOMAIN), [TensorInfo(np.float32, (3, 4))])
    g.add_node(Node("Dense", ("h", "w"), ("y",), {"activation": "none"}, domain=ENGINE_DOMAIN), [TensorInfo(np.float32, (3, 4))])
    g.add_output("y")
    assert encoder_dense(g) == {"h", "y"}


def test_all_marks_the_heads_too():
    _, after, _ = quantized(quantize="int8", quantize_layers="all")
    assert all(n.attrs.get("quantize") == "int8" for n in dense(after))
    assert marked_biases(after) >= HEADS


@pytest.mark.parametrize("path", [SEQ_CLS, DYNAMO])
def test_name_patterns_select_and_exclude(path):
    # matched against the node, weight and bias names: the dynamo export's node names are
    # "node_MatMul_88", but its biases are named after the module
    _, after, _ = quantized(path, quantize="int8", quantize_layers=[r"intermediate", r"classifier"])
    assert marked_biases(after) == {
        "bert.encoder.layer.0.intermediate.dense.bias",
        "bert.encoder.layer.1.intermediate.dense.bias",
        "classifier.bias",
    }
    _, after, _ = quantized(path, quantize="int8", quantize_exclude=[r"layer\.1\.", r"query"])
    assert marked_biases(after) == {
        "bert.encoder.layer.0.attention.output.dense.bias",
        "bert.encoder.layer.0.intermediate.dense.bias",
        "bert.encoder.layer.0.output.dense.bias",
    }


@pytest.mark.parametrize("config", [{}, {"quantize": None}, {"quantize": "none"}, {"quantize": False}])
def test_off_unless_asked(config):
    before, after, _ = quantized(**config)
    assert structure(after) == structure(before)
    assert not any("quantize" in n.attrs for n in after.nodes)


def test_a_quantized_dense_weight_is_stored_dense():
    # the layout pass forced to CSR for every weight; these weights have no all-zero 4x1 block, so
    # a quantized node says dense (int8 decides), and an excluded one keeps its sparse fp32 layout
    _, after, _ = quantized(quantize="int8", sparsity={"layout": "csr"}, quantize_exclude=[r"layer\.0\.output"])
    for n in dense(after):
        if n.attrs.get("quantize") == "int8":
            assert (n.attrs["layout"], n.attrs["block"]) == ("dense", [])
        else:
            assert n.attrs["layout"] == "csr", n
    assert "bert.encoder.layer.0.output.dense.bias" not in marked_biases(after)


def test_only_constant_finite_float32_weights_are_marked():
    g = Graph("weights")
    g.add_input("x", TensorInfo(np.float32, (3, 4)))
    g.add_input("w_in", TensorInfo(np.float32, (4, 4)))
    bad = np.ones((4, 4), np.float32)
    bad[1, 2] = np.nan
    for name, value in {"w_ok": np.ones((4, 4), np.float32), "w_nan": bad, "w_f64": np.ones((4, 4))}.items():
        g.add_constant(name, value)
    for i, w in enumerate(("w_ok", "w_nan", "w_f64", "w_in")):
        g.add_node(Node("Dense", ("x", w), (f"y{i}",), {"activation": "none"}, domain=ENGINE_DOMAIN), [TensorInfo(np.float32, (3, 4))])
        g.add_output(f"y{i}")
    ctx = PassContext(config={"quantize": "int8", "quantize_layers": "all"}, ran=["fuse_dense"])
    assert quantize_dense.run(g, ctx) == 1
    assert [n.attrs.get("quantize") for n in g.nodes] == ["int8", None, None, None]


def test_requires_fuse_dense():
    graph = import_onnx(FIXTURES / SEQ_CLS)
    with pytest.raises(PassError, match="requires \\['fuse_dense'\\]"):
        quantize_dense(graph, PassContext(config={"quantize": "int8"}))
    default_pipeline()(graph, ctx := PassContext(config={"quantize": "int8"}))
    quantize_dense(graph, ctx)  # fine once it has run
    assert marked_biases(graph)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quantize": "int4"}, r"config\['quantize'\] must be None, 'none' or one of \['int8'\], got 'int4'"),
        ({"quantize": True}, r"got True"),
        (
            {"quantize": "int8", "quantize_layers": "heads"},
            r"must be one of \['encoder', 'all'\] or a list of regular expressions.*'heads'",
        ),
        (
            {"quantize": "int8", "quantize_layers": 3},
            r"config\['quantize_layers'\] must be a list of regular expressions \(strings\), got 3",
        ),
        ({"quantize": "int8", "quantize_layers": ["ok", "(unclosed"]}, r"'\(unclosed' is not a valid regular expression"),
        ({"quantize": "int8", "quantize_exclude": "pooler"}, r"config\['quantize_exclude'\] must be a list of regular expressions"),
        ({"quantize": "int8", "quantize_sparse_max_density": 2}, r"quantize_sparse_max_density'\] must be a number in \[0, 1\].*got 2"),
        ({"quantize": "int8", "quantize_attention": "yes"}, r"config\['quantize_attention'\] must be True or False, got 'yes'"),
    ],
)
def test_bad_settings_are_clear_errors(config, message):
    graph = import_onnx(FIXTURES / SEQ_CLS)
    with pytest.raises(ValueError, match=message):
        quantize_dense.run(graph, PassContext(config=config, ran=["fuse_dense"]))


def attention_marks(graph: Graph) -> list:
    return [n.attrs.get("quantize") for n in graph.nodes if n.domain == ENGINE_DOMAIN and n.op == "Attention"]


@pytest.mark.parametrize(
    ("setting", "expected"), [({}, "int8"), ({"quantize_attention": True}, "int8"), ({"quantize_attention": False}, None)]
)
def test_attention_runs_in_int8_unless_turned_off(setting, expected):
    before, after, feeds = quantized(quantize="int8", **setting)
    assert attention_marks(before) == [None, None]
    assert attention_marks(after) == [expected, expected]
    for x, y in zip(run_graph(before, feeds), run_graph(after, feeds)):  # the reference ignores the mark
        np.testing.assert_array_equal(x, y)


def test_attention_stays_fp32_without_int8():
    _, after, _ = quantized(quantize_attention=True)
    assert attention_marks(after) == [None, None]


# ----------------------------------------------------------------------------- sparse int8 weights


def sparse_weights(K: int = 37, N: int = 24) -> dict[str, np.ndarray]:
    """Weights [K, N] (K not a multiple of 4) with known fractions of nonzero 4x1 blocks."""
    rng = np.random.default_rng(7)
    w = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    g = -(-K // 4)
    blocks = np.zeros((g, N), bool)
    blocks.flat[rng.choice(g * N, round(0.1 * g * N), replace=False)] = True
    structured = w * np.repeat(blocks, 4, axis=0)[:K]
    unstructured = w * (rng.random((K, N)) < 0.04)  # 12% of the 4x1 blocks nonzero
    return {"w_4x1": structured, "w_unstructured": unstructured, "w_dense": w}


def sparse_graph(weights: dict[str, np.ndarray]) -> Graph:
    g = Graph("sparse-weights")
    K, N = next(iter(weights.values())).shape
    g.add_input("x", TensorInfo(np.float32, (5, K)))
    for name, w in weights.items():
        g.add_constant(name, w)
        g.add_node(
            Node("Dense", ("x", name), (f"y_{name}",), {"activation": "none"}, domain=ENGINE_DOMAIN), [TensorInfo(np.float32, (5, N))]
        )
        g.add_output(f"y_{name}")
    return g


def layouts(graph: Graph) -> dict[str, tuple[str, list]]:
    return {n.inputs[1]: (n.attrs.get("layout", "dense"), n.attrs.get("block", [])) for n in dense(graph)}


def test_block_density_4x1_pads_k():
    w = np.zeros((10, 3), np.float32)  # blocks of k 0-3, 4-7, 8-9 (+ 2 padding rows)
    w[9, 0] = 1.0
    w[[0, 3], 1] = 1.0
    assert block_density_4x1(w) == 2 / 9
    assert block_density_4x1(sparse_weights()["w_4x1"]) == pytest.approx(0.1, abs=0.01)
    assert block_density_4x1(np.zeros((0, 4), np.float32)) == 1.0


def test_a_sparse_quantized_weight_is_stored_in_4x1_blocks():
    weights = sparse_weights()
    assert block_density_4x1(weights["w_unstructured"]) < INT8_SPARSE_MAX_BLOCK_DENSITY < block_density_4x1(weights["w_dense"])
    g = sparse_graph(weights)
    before = g.copy()
    assert quantize_dense.run(g, PassContext(config={"quantize": "int8", "quantize_layers": "all"}, ran=["fuse_dense"])) == 3
    assert layouts(g) == {"w_4x1": ("bsr", [4, 1]), "w_unstructured": ("bsr", [4, 1]), "w_dense": ("dense", [])}
    assert all(n.attrs["quantize"] == "int8" for n in dense(g))
    feeds = {"x": np.random.default_rng(0).uniform(-1, 1, (5, 37)).astype(np.float32)}
    for a, b in zip(run_graph(before, feeds), run_graph(g, feeds)):  # the reference ignores layout and quantize
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"quantize_sparse_max_density": 0}, {"w_4x1": "dense", "w_unstructured": "dense", "w_dense": "dense"}),
        ({"quantize_sparse_max_density": 1.0}, {"w_4x1": "bsr", "w_unstructured": "bsr", "w_dense": "bsr"}),
        ({"quantize_sparse_max_density": 0.11}, {"w_4x1": "bsr", "w_unstructured": "dense", "w_dense": "dense"}),
        ({"sparsity": {"layout": "dense"}}, {"w_4x1": "dense", "w_unstructured": "dense", "w_dense": "dense"}),
        ({"sparsity": {"per_weight": {"w_4x1": "dense"}}}, {"w_4x1": "dense", "w_unstructured": "bsr", "w_dense": "dense"}),
        ({"sparsity": {"layout": "csr"}}, {"w_4x1": "bsr", "w_unstructured": "bsr", "w_dense": "dense"}),
    ],
)
def test_sparse_int8_settings(config, expected):
    g = sparse_graph(sparse_weights())
    quantize_dense.run(g, PassContext(config={"quantize": "int8", "quantize_layers": "all", **config}, ran=["fuse_dense"]))
    assert {w: layout for w, (layout, _) in layouts(g).items()} == expected
