"""fuse_embedding and fuse_attention_mask_row: the steps before the first encoder layer.

Pattern tests build the exporters' embedding sums with onnx.helper; the fixture tests check both
passes fire on every BERT / DistilBERT / RoBERTa fixture (torch exports at opset 17 and 14, and
the Hugging Face builder's eager-mask form) and change no output bit on the reference executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from sparseinfer.export import from_huggingface
from sparseinfer.graph import Node, TensorInfo, import_onnx, run_graph
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, default_pipeline, fold_constants, fuse_attention_mask_row, fuse_embedding, fuse_layernorm
from tests.conftest import FIXTURES, make_inputs, manifest_entry, model_ids
from tests.passes.builders import FP32_ATOL, FP32_RTOL, f32, i64, node, only, onnx_graph, optimize, random_feeds

B, S, H, VOCAB = 2, 5, 8, 11
RNG = np.random.default_rng(0)
TABLES = {
    "word": (RNG.standard_normal((VOCAB, H)) * 0.3).astype(np.float32),
    "types": (RNG.standard_normal((2, H)) * 0.3).astype(np.float32),
    "pos": (RNG.standard_normal((1, S, H)) * 0.3).astype(np.float32),
    "gamma": (1 + 0.1 * RNG.standard_normal(H)).astype(np.float32),
    "beta": (0.1 * RNG.standard_normal(H)).astype(np.float32),
}
OFF = {"fuse_embedding": False, "fuse_attention_mask_row": False}


def embedding_nodes(order: str = "wtp", swap: bool = False) -> list:
    """Gathers of word (w) and type (t) embeddings and the position constant (p), added left to
    right in `order` (`swap`: each Add's operands the other way round), then LayerNormalization."""
    nodes = [node("Gather", ["word", "ids"], ["w"]), node("Gather", ["types", "type_ids"], ["t"])]
    acc = order[0]
    for k, term in enumerate(order[1:]):
        out = "sum" if k == len(order) - 2 else f"acc{k}"
        nodes.append(node("Add", [term, acc] if swap else [acc, term], [out]))
        acc = out
    src = "sum" if len(order) > 1 else order
    return nodes + [node("LayerNormalization", [src, "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]


def embedding_graph(nodes: list, outputs=("y",), tables: dict | None = None):
    inputs = {"ids": [B, S], "type_ids": [B, S]}
    dtypes = {"ids": TensorProto.INT64, "type_ids": TensorProto.INT64}
    inits = {"p": TABLES["pos"], **{k: v for k, v in TABLES.items() if k != "pos"}, **(tables or {})}
    return onnx_graph(nodes, inputs, list(outputs), inits, input_dtypes=dtypes)


def id_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(-VOCAB, VOCAB, (B, S)).astype(np.int64), "type_ids": rng.integers(0, 2, (B, S)).astype(np.int64)}


def assert_identical(before, after, feeds) -> None:
    for w, g in zip(run_graph(before, feeds), run_graph(after, feeds)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


# ----------------------------------------------------------------------------- the pattern


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("order", ["wtp", "wpt", "pwt", "tw", "w"])
def test_embedding_fuses_in_any_add_order(order, swap):
    before = embedding_graph(embedding_nodes(order, swap))
    after = optimize(before, fold_constants, fuse_embedding)
    emb = only(after, "Embedding")
    assert after.op_counts() == {"Embedding": 1}
    assert emb.domain == ENGINE_DOMAIN and emb.outputs == ("y",)
    kinds = {"w": "gather", "t": "gather", "p": "add"}
    if swap and len(order) > 1:  # the first two terms in either order: float addition commutes exactly
        assert sorted(emb.attrs["terms"][:2]) == sorted(kinds[c] for c in order[:2])
    else:
        assert emb.attrs["terms"] == tuple(kinds[c] for c in order)
    assert emb.attrs["epsilon"] == pytest.approx(1e-12)
    assert_identical(before, after, id_feeds())


def test_embedding_reference_equals_the_onnx_reference_evaluator():
    """The Embedding op against onnx's own evaluator of the unfused graph (negative ids included)."""
    nodes = embedding_nodes("wtp")
    inits = [numpy_helper.from_array(TABLES["pos"], "p")] + [numpy_helper.from_array(v, k) for k, v in TABLES.items() if k != "pos"]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, [B, S]) for n in ("ids", "type_ids")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    model = helper.make_model(helper.make_graph(nodes, "emb", ins, out, inits), opset_imports=[helper.make_opsetid("", 17)])
    fused = optimize(import_onnx(model), fold_constants, fuse_embedding)
    assert fused.op_counts() == {"Embedding": 1}
    feeds = id_feeds(1)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(run_graph(fused, feeds)[0], want, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_decomposed_layernorm_fuses_too():
    """Below opset 17 the LayerNorm is spelled out; fuse_layernorm first, then the embedding."""
    nodes = embedding_nodes("wtp")[:-1] + [
        node("ReduceMean", ["sum"], ["mean"], axes=[-1]),
        node("Sub", ["sum", "mean"], ["d"]),
        node("Pow", ["d", "two"], ["sq"]),
        node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        node("Add", ["var", "eps"], ["ve"]),
        node("Sqrt", ["ve"], ["std"]),
        node("Div", ["d", "std"], ["n"]),
        node("Mul", ["n", "gamma"], ["ng"]),
        node("Add", ["ng", "beta"], ["y"]),
    ]
    before = onnx_graph(
        nodes,
        {"ids": [B, S], "type_ids": [B, S]},
        ["y"],
        {"p": TABLES["pos"], "two": f32(2.0), "eps": f32(1e-12), **{k: v for k, v in TABLES.items() if k != "pos"}},
        opset=13,
        input_dtypes={"ids": TensorProto.INT64, "type_ids": TensorProto.INT64},
    )
    after = optimize(before, fold_constants, fuse_layernorm, fuse_embedding)
    assert after.op_counts() == {"Embedding": 1}
    assert_identical(optimize(before, fold_constants, fuse_layernorm), after, id_feeds(2))


def _near_misses():
    yield "the sum is also a graph output", embedding_graph(embedding_nodes("wtp"), outputs=("y", "sum"))
    yield "a gather is also a graph output", embedding_graph(embedding_nodes("wtp"), outputs=("y", "w"))
    over_axis_1 = embedding_nodes("wtp")[:-1] + [node("LayerNormalization", ["sum", "g1", "b1"], ["y"], axis=1)]
    yield (
        "LayerNorm over a non-last axis",
        embedding_graph(over_axis_1, tables={"g1": np.ones((S, 1), np.float32), "b1": np.zeros((S, 1), np.float32)}),
    )
    yield (
        "float64 tables",
        embedding_graph(
            embedding_nodes("wt"),
            tables={k: TABLES[k].astype(np.float64) for k in ("word", "types", "gamma", "beta")},
        ),
    )
    tree = [
        node("Gather", ["word", "ids"], ["w"]),
        node("Gather", ["types", "type_ids"], ["t"]),
        node("Gather", ["word", "type_ids"], ["w2"]),
        node("Gather", ["types", "ids_mod"], ["t2"]),
        node("Mod", ["ids", "two"], ["ids_mod"]),
        node("Add", ["w", "t"], ["a"]),
        node("Add", ["w2", "t2"], ["b"]),
        node("Add", ["a", "b"], ["sum"]),
        node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12),
    ]
    tree.insert(3, tree.pop(4))  # Mod before its Gather
    yield "an Add tree, not a left-to-right sum", embedding_graph(tree, tables={"two": i64(2)})
    runtime = [node("Gather", ["word", "ids"], ["w"]), node("Cast", ["type_ids"], ["tf"], to=TensorProto.FLOAT)]
    runtime += [node("Unsqueeze", ["tf", "last"], ["tu"]), node("Add", ["w", "tu"], ["sum"])]
    runtime += [node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    yield "a term computed at run time", embedding_graph(runtime, tables={"last": i64([-1])})
    broadcast = [node("Gather", ["types", "type_ids"], ["t"]), node("Add", ["t", "wide"], ["sum"])]
    broadcast += [node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    yield "a constant that widens the gather", embedding_graph(broadcast, tables={"wide": np.ones((3, B, S, H), np.float32)})


@pytest.mark.parametrize("why, before", list(_near_misses()), ids=lambda v: v if isinstance(v, str) else "")
def test_embedding_near_misses_do_not_fuse(why, before):
    after = optimize(before, fold_constants, fuse_embedding)
    assert "Embedding" not in after.op_counts(), why
    feeds = random_feeds(before)
    feeds = {k: np.abs(v) % 2 for k, v in feeds.items()}
    assert_identical(before, after, feeds)


def test_embedding_can_be_switched_off():
    before = embedding_graph(embedding_nodes("wtp"))
    after = optimize(before, fold_constants, fuse_embedding, ctx=PassContext(validate=True, config={"fuse_embedding": False}))
    assert "Embedding" not in after.op_counts()


# ----------------------------------------------------------------------------- the fixtures


def _optimised(model, feeds, config=None):
    graph = bind_dims(import_onnx(model), {k: v.shape for k, v in feeds.items()})
    default_pipeline()(graph, PassContext(validate=True, config=dict(config or {})))
    return graph


@pytest.mark.parametrize("path", model_ids())
def test_fixtures_fuse_and_no_output_changes(path):
    """Every fixture (torch exports at opset 17 and 14, dynamo at 18): one Embedding, one
    AttentionMaskRow read by every Attention, and the reference executor's outputs unchanged."""
    feeds = make_inputs(manifest_entry(path), 3, 11, seed=5)  # rows right-padded: the mask matters
    fused, plain = _optimised(FIXTURES / path, feeds), _optimised(FIXTURES / path, feeds, OFF)
    counts = fused.op_counts()
    assert counts.get("Embedding") == 1 and counts.get("AttentionMaskRow") == 1, counts
    assert only(fused, "AttentionMaskRow").attrs["mode"] == "where"
    assert not any(n.op == "Gather" and "input_ids" in n.inputs for n in fused.nodes)
    mask_users = [n.op for n in fused.nodes if "attention_mask" in n.inputs]
    assert mask_users == ["AttentionMaskRow"], mask_users
    assert all(n.inputs[3] == only(fused, "AttentionMaskRow").outputs[0] for n in fused.nodes if n.op == "Attention")
    assert_identical(plain, fused, feeds)


@pytest.mark.parametrize("name", ["bert-token-classification", "distilbert-question-answering", "roberta-sequence-classification"])
def test_eager_mask_form_fuses_as_mul(name):
    """The Hugging Face builder writes the eager mask (1 - m) * float32_min, already [B, 1, 1, S]."""
    model = from_huggingface(Path(FIXTURES) / name)
    feeds = make_inputs(manifest_entry(f"{name}/model.onnx"), 2, 7, seed=1)
    fused, plain = _optimised(model, feeds), _optimised(model, feeds, OFF)
    row = only(fused, "AttentionMaskRow")
    assert row.attrs == {"mode": "mul", "value": float(np.finfo(np.float32).min)}
    assert "Embedding" in fused.op_counts()
    feeds["attention_mask"][1, 2] = 2  # not 0 / 1: the formula, not a lookup, is what was matched
    assert_identical(plain, fused, feeds)


def _mask_graph(tail: list, inits: dict):
    """attention_mask → Unsqueeze(1), Unsqueeze(2) → Cast → `tail` → "row" [B, 1, 1, S], read by an
    Attention over a runtime x (so fuse_attention_mask_row has an Attention to look at)."""
    nodes = [
        node("Unsqueeze", ["m", "ax1"], ["m1"]),
        node("Unsqueeze", ["m1", "ax2"], ["m2"]),
        node("Cast", ["m2"], ["mf"], to=TensorProto.FLOAT),
        *tail,
        node("Identity", ["x"], ["y"]),
    ]
    g = onnx_graph(
        nodes,
        {"m": [B, S], "x": [B, S, H]},
        ["y", "row"],
        {"ax1": i64([1]), "ax2": i64([2]), **inits},
        input_dtypes={"m": TensorProto.INT64},
    )
    att = Node("Attention", ("x", "x", "x", "row"), ("att",), {"num_heads": 2, "scale": 0.5}, name="att", domain=ENGINE_DOMAIN)
    g.add_node(att, [TensorInfo(np.float32, (B, S, H))])
    g.outputs = ["att"]
    g.remove_unused()
    return g


@pytest.mark.parametrize(
    "tail, inits, expect",
    [
        ([node("Sub", ["one", "mf"], ["d"]), node("Mul", ["d", "big"], ["row"])], {"one": f32(1.0), "big": f32(-10000.0)}, ("mul", -10000.0)),
        ([node("Sub", ["one", "mf"], ["d"]), node("Mul", ["big", "d"], ["row"])], {"one": f32(1.0), "big": f32(-3e38)}, ("mul", float(np.float32(-3e38)))),
        (
            [node("Sub", ["one", "mf"], ["d"]), node("Cast", ["d"], ["c"], to=TensorProto.BOOL), node("Where", ["c", "big", "d"], ["row"])],
            {"one": f32(1.0), "big": f32(-3e38)},
            ("where", float(np.float32(-3e38))),
        ),
        # near misses: the formula differs from both forms somewhere, or the op is not elementwise
        ([node("Sub", ["one", "mf"], ["d"]), node("Mul", ["d", "big"], ["row"])], {"one": f32(2.0), "big": f32(-10000.0)}, None),
        ([node("Sub", ["mf", "one"], ["d"]), node("Mul", ["d", "big"], ["row"])], {"one": f32(1.0), "big": f32(-10000.0)}, None),
        ([node("Sub", ["one", "mf"], ["d"]), node("Mul", ["d", "big"], ["row"])], {"one": f32(1.0), "big": f32(np.linspace(-1, -2, S).reshape(1, 1, 1, S))}, None),
        ([node("Sub", ["one", "mf"], ["d"]), node("Mul", ["d", "big"], ["p"]), node("CumSum", ["p", "ax3"], ["row"])], {"one": f32(1.0), "big": f32(-1.0), "ax3": i64(3)}, None),
    ],
)  # fmt: skip
def test_mask_row_pattern(tail, inits, expect):
    before = _mask_graph(tail, inits)
    ctx = PassContext(validate=True)
    ctx.ran.append("fuse_attention")
    after = before.copy()
    fuse_attention_mask_row(after, ctx)
    rows = [n for n in after.nodes if n.op == "AttentionMaskRow"]
    if expect is None:
        assert not rows
    else:
        assert len(rows) == 1 and (rows[0].attrs["mode"], rows[0].attrs["value"]) == expect
        assert [n.op for n in after.nodes] == ["AttentionMaskRow", "Attention"]
    x = np.random.default_rng(0).standard_normal((B, S, H)).astype(np.float32)
    for m in (np.array([[1] * S, [1] * (S - 2) + [0] * 2]), np.arange(B * S).reshape(B, S) - 3):
        assert_identical(before, after, {"m": m.astype(np.int64), "x": x})
