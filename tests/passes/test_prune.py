"""Magnitude pruning: `prune` and `weight_sparsity`.

Oracles: a NumPy reimplementation of magnitude pruning (stable argsort of |w| or of block L2
norms), the exporter's own module names for which weights are encoder layers and which are task
heads, onnx.checker, and onnxruntime: the pruned file must compute exactly what the original
model computes with the same weights zeroed by NumPy.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sparseinfer.passes.prune import prune, weight_sparsity
from tests.conftest import FIXTURES, make_inputs, manifest_entry, model_ids

BERT_SEQ = "bert-sequence-classification/model.onnx"
BERT_TOKEN = "bert-token-classification/model.onnx"
DISTIL_SEQ = "distilbert-sequence-classification/model.onnx"
ROBERTA_SEQ = "roberta-sequence-classification/model.onnx"
# the module itself, even if a package re-exports the function under the same name
prune_module = importlib.import_module("sparseinfer.passes.prune")
# the dynamo exporter names nodes node_MatMul_27 etc.: the heads are known from the module instead
DYNAMO_HEADS = {"bert.pooler.dense.weight", "classifier.weight"}


# ----------------------------------------------------------------------------- oracles and helpers


def numpy_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the round(sparsity * size) smallest |w|, ties to the lower row-major index."""
    k = round(sparsity * w.size)
    flat = w.copy().reshape(-1)
    flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0
    return flat.reshape(w.shape)


def numpy_prune_global(ws: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    scores = np.concatenate([np.abs(w).reshape(-1) for w in ws])
    k = round(sparsity * scores.size)
    zero = np.zeros(scores.size, dtype=bool)
    zero[np.argsort(scores, kind="stable")[:k]] = True
    out, start = [], 0
    for w in ws:
        flat = w.copy().reshape(-1)
        flat[zero[start : start + w.size]] = 0
        out.append(flat.reshape(w.shape))
        start += w.size
    return out


def block_norms(view: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    (k, n), (r, c) = view.shape, block
    grid = view.astype(np.float64).reshape(k // r, r, n // c, c)
    return np.sqrt(np.square(grid).sum(axis=(1, 3)))


def numpy_prune_blocks(view: np.ndarray, block: tuple[int, int], sparsity: float) -> np.ndarray:
    """The [K, N] view with the round(sparsity * blocks) lowest-L2 blocks zeroed."""
    norms = block_norms(view, block)
    k = round(sparsity * norms.size)
    zero = np.zeros(norms.size, dtype=bool)
    zero[np.argsort(norms.reshape(-1), kind="stable")[:k]] = True
    mask = np.kron(zero.reshape(norms.shape), np.ones(block, dtype=bool)).astype(bool)
    return np.where(mask, 0, view).astype(view.dtype)


def weights(model) -> dict[str, np.ndarray]:
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def tensor_bytes(model) -> dict[str, bytes]:
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    return {t.name: t.SerializeToString() for t in proto.graph.initializer}


def expected_roles(path: str) -> dict[str, str]:
    """Roles from the exporter's module names (TorchScript node names are module paths)."""
    proto = onnx.load(str(FIXTURES / path))
    roles = {}
    for n in proto.graph.node:
        if n.op_type == "Gather" and n.input[0].endswith("embeddings.weight"):
            roles[n.input[0]] = "embedding"
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in {t.name for t in proto.graph.initializer}:
            if "dynamo" in path:
                roles[n.input[1]] = "head" if n.input[1] in DYNAMO_HEADS else "encoder"
            else:
                roles[n.input[1]] = "encoder" if ("/encoder/layer." in n.name or "/transformer/layer." in n.name) else "head"
    return roles


def with_weights(path: Path, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    proto = onnx.load(str(path))
    for t in proto.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name], t.name))
    return proto


def run(model, feeds) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_model(nodes, inits: dict[str, np.ndarray], inputs: dict[str, list[int]], outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def one_matmul(w: np.ndarray, name: str = "w") -> onnx.ModelProto:
    return tiny_model([helper.make_node("MatMul", ["x", name], ["y"])], {name: w}, {"x": [1, w.shape[0]]}, ["y"])


# ----------------------------------------------------------------------------- which weights


@pytest.mark.parametrize("path", model_ids())
def test_roles_match_the_exporters_module_names(path):
    rows = weight_sparsity(FIXTURES / path)
    assert {r["name"]: r["role"] for r in rows} == expected_roles(path)


def test_head_rule_is_graph_position_not_names():
    """A linear whose output reaches a layer norm is encoder; after the last layer norm, a head."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 8), dtype=np.float32), rng.standard_normal((8, 3), dtype=np.float32)
    scale, bias = np.ones(8, np.float32), np.zeros(8, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "classifier.weight"], ["h"]),  # the name says head, the graph says encoder
        helper.make_node("Add", ["h", "x"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "scale", "bias"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    model = tiny_model(nodes, {"classifier.weight": w1, "w2": w2, "scale": scale, "bias": bias}, {"x": [2, 8]}, ["y"])
    assert {r["name"]: r["role"] for r in weight_sparsity(model)} == {"classifier.weight": "encoder", "w2": "head"}


def test_without_layer_norms_head_names_decide():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "dense.weight"], ["h"]), helper.make_node("MatMul", ["h", "classifier.weight"], ["y"])]
    inits = {
        "dense.weight": rng.standard_normal((4, 4), dtype=np.float32),
        "classifier.weight": rng.standard_normal((4, 2), dtype=np.float32),
    }
    model = tiny_model(nodes, inits, {"x": [1, 4]}, ["y"])
    assert {r["name"]: r["role"] for r in weight_sparsity(model)} == {"dense.weight": "encoder", "classifier.weight": "head"}
    pruned = weights(prune(model, 0.5))
    np.testing.assert_array_equal(pruned["dense.weight"], numpy_prune(inits["dense.weight"], 0.5))
    np.testing.assert_array_equal(pruned["classifier.weight"], inits["classifier.weight"])


# ----------------------------------------------------------------------------- per-layer, global


@pytest.mark.parametrize("path", model_ids())
def test_per_layer_pruning_is_the_numpy_oracle_and_runs_in_onnxruntime(path, tmp_path):
    source, out = FIXTURES / path, tmp_path / "pruned.onnx"
    sparsity = 0.75 if "opset14" in path else 0.6
    before_hash, original = sha(source), weights(source)
    roles = expected_roles(path)

    returned = prune(source, sparsity, out=out)

    assert sha(source) == before_hash  # the source file is never modified
    onnx.checker.check_model(str(out), full_check=True)
    assert tensor_bytes(returned) == tensor_bytes(out)
    expected = {name: numpy_prune(original[name], sparsity) for name, role in roles.items() if role == "encoder"}
    pruned, before_bytes, after_bytes = weights(out), tensor_bytes(source), tensor_bytes(out)
    for name in original:
        if name in expected:
            np.testing.assert_array_equal(pruned[name], expected[name], err_msg=name)
            assert abs(np.count_nonzero(pruned[name] == 0) - sparsity * pruned[name].size) <= 1, name
        else:  # embeddings, heads, biases, layer-norm parameters: byte-identical
            assert after_bytes[name] == before_bytes[name], name
    if "dynamo" in path:
        return  # its input signature differs from the TorchScript fixtures' make_inputs
    feeds = make_inputs(manifest_entry(path), batch=2, seq=16)
    for got, want in zip(run(out, feeds), run(with_weights(source, expected), feeds)):
        np.testing.assert_array_equal(got, want)  # the only change is the zeroing


def test_heads_and_embeddings_are_pruned_when_asked():
    source = FIXTURES / BERT_SEQ
    original = weights(source)
    only_heads = weights(prune(source, 0.5, heads=True))
    both = weights(prune(source, 0.5, heads=True, embeddings=True))
    for name, role in expected_roles(BERT_SEQ).items():
        want = original[name] if role == "embedding" else numpy_prune(original[name], 0.5)
        np.testing.assert_array_equal(only_heads[name], want, err_msg=name)
        np.testing.assert_array_equal(both[name], numpy_prune(original[name], 0.5), err_msg=name)


def test_global_scope_reaches_the_overall_target_with_one_threshold():
    source = FIXTURES / BERT_TOKEN
    original = weights(source)
    names = [r["name"] for r in weight_sparsity(source) if r["role"] == "encoder"]
    pruned = weights(prune(source, 0.6, scope="global"))
    want = numpy_prune_global([original[n] for n in names], 0.6)
    for name, w in zip(names, want):
        np.testing.assert_array_equal(pruned[name], w, err_msg=name)
    total = sum(original[n].size for n in names)
    assert sum(np.count_nonzero(pruned[n] == 0) for n in names) == round(0.6 * total)
    per_weight = {np.count_nonzero(pruned[n] == 0) / pruned[n].size for n in names}
    assert len(per_weight) > 1  # one threshold: the layers' sparsities differ
    kept_min = min(np.abs(pruned[n][pruned[n] != 0]).min() for n in names)
    dropped_max = max(np.abs(original[n][pruned[n] == 0]).max() for n in names)
    assert dropped_max <= kept_min


def test_a_shared_weight_is_pruned_once_and_counted_once():
    rng = np.random.default_rng(2)
    shared, other = rng.standard_normal((6, 6), dtype=np.float32), rng.standard_normal((6, 6), dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "shared"], ["a"]),
        helper.make_node("MatMul", ["a", "shared"], ["b"]),
        helper.make_node("MatMul", ["b", "other"], ["y"]),
    ]
    model = tiny_model(nodes, {"shared": shared, "other": other}, {"x": [1, 6]}, ["y"])
    assert [r["name"] for r in weight_sparsity(model)] == ["shared", "other"]
    pruned = weights(prune(model, 0.5, scope="global"))
    want = numpy_prune_global([shared, other], 0.5)
    np.testing.assert_array_equal(pruned["shared"], want[0])
    np.testing.assert_array_equal(pruned["other"], want[1])
    assert np.count_nonzero(pruned["shared"] == 0) + np.count_nonzero(pruned["other"] == 0) == 36


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (2, 2), (8, 8)])
@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_block_pruning_zeroes_whole_blocks(block, scope):
    source = FIXTURES / DISTIL_SEQ
    original = weights(source)
    pruned = weights(prune(source, 0.7, block=block, scope=scope))
    names = [r["name"] for r in weight_sparsity(source) if r["role"] == "encoder"]
    zero_blocks = total_blocks = 0
    for name in names:
        grid_before = block_norms(original[name], block)
        got = pruned[name].reshape(grid_before.shape[0], block[0], grid_before.shape[1], block[1])
        was = original[name].reshape(got.shape)
        zero = ~got.any(axis=(1, 3))
        untouched = (got == was).all(axis=(1, 3))
        assert (zero | untouched).all(), name  # every block is all-zero or exactly as it was
        if scope == "per-layer":
            np.testing.assert_array_equal(pruned[name], numpy_prune_blocks(original[name], block, 0.7), err_msg=name)
        zero_blocks, total_blocks = zero_blocks + zero.sum(), total_blocks + zero.size
    if scope == "global":
        assert zero_blocks == round(0.7 * total_blocks)
    else:  # each weight is rounded on its own
        assert abs(zero_blocks - 0.7 * total_blocks) <= len(names) / 2
    rows = weight_sparsity(prune(source, 0.7, block=block, scope=scope), block=block)
    assert sum(r["zero_blocks"] for r in rows if r["role"] == "encoder") == zero_blocks


def test_blocks_of_a_transposed_gemm_weight_follow_the_product():
    """classifier.weight is stored [N, K] = [3, 32] (transB=1): a (4, 1) block is 4 consecutive K,
    i.e. 4 consecutive entries of a stored row; (4, 1) would not even tile the stored layout."""
    source = FIXTURES / BERT_SEQ
    original = weights(source)
    pruned = weights(prune(source, 0.5, block=(4, 1), heads=True))
    for name in ("classifier.weight", "bert.pooler.dense.weight"):
        view = original[name].T
        np.testing.assert_array_equal(pruned[name].T, numpy_prune_blocks(view, (4, 1), 0.5), err_msg=name)
    runs = pruned["classifier.weight"].reshape(3, 8, 4)
    assert (~runs.any(axis=2)).sum() == round(0.5 * 24)


def test_block_that_does_not_tile_is_refused():
    with pytest.raises(ValueError, match=r"block \(1, 4\) does not tile weight 'onnx::MatMul_331' \(head\) of shape \(32, 7\)"):
        prune(FIXTURES / BERT_TOKEN, 0.5, block=(1, 4), heads=True)
    with pytest.raises(ValueError, match=r"'roberta\.embeddings\.position_embeddings\.weight' \(embedding\) of shape \(130, 32\)"):
        prune(FIXTURES / ROBERTA_SEQ, 0.5, block=(4, 1), embeddings=True, exclude=["token_type"])
    with pytest.raises(ValueError, match=r"'classifier\.weight' \(head\) of \[K, N\] view \(32, 3\) \(stored transposed, \(3, 32\)\)"):
        prune(FIXTURES / BERT_SEQ, 0.5, block=(1, 2), heads=True)
    prune(FIXTURES / BERT_TOKEN, 0.5, block=(1, 4))  # the encoder alone tiles: the head is not selected


# ----------------------------------------------------------------------------- unchanged things


@pytest.mark.parametrize(
    "kwargs", [{}, {"scope": "global"}, {"block": (4, 1), "heads": True}, {"block": (1, 4), "embeddings": True, "scope": "global"}]
)
def test_sparsity_zero_changes_nothing(kwargs, tmp_path):
    source, out = FIXTURES / BERT_SEQ, tmp_path / "same.onnx"
    prune(source, 0.0, out=out, **kwargs)
    assert tensor_bytes(out) == tensor_bytes(source)
    feeds = make_inputs(manifest_entry(BERT_SEQ), batch=2, seq=12)
    for got, want in zip(run(out, feeds), run(source, feeds)):
        np.testing.assert_array_equal(got, want)


def test_a_proto_argument_is_not_modified():
    proto = onnx.load(str(FIXTURES / DISTIL_SEQ))
    before = proto.SerializeToString()
    pruned = prune(proto, 0.5)
    assert proto.SerializeToString() == before
    assert pruned is not proto and tensor_bytes(pruned) != tensor_bytes(proto)


def test_external_data_in_and_out(tmp_path, monkeypatch):
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(FIXTURES / BERT_SEQ)), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    inline = prune(FIXTURES / BERT_SEQ, 0.8)
    assert_same_weights(prune(source.parent, 0.8), inline)  # a directory and external weights load alike

    monkeypatch.setattr(prune_module, "_INLINE_LIMIT", 0)  # stand-in for a > 2 GB model
    out = tmp_path / "out" / "pruned.onnx"
    data, sizes = out.parent / "pruned.onnx.data", []
    for _ in range(2):  # a second run replaces the side file instead of appending to it
        returned = prune(source, 0.8, out=out)
        sizes.append(data.stat().st_size)
    assert sizes[0] == sizes[1] > 0
    onnx.checker.check_model(str(out), full_check=True)
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    assert all(t.data_location != TensorProto.EXTERNAL for t in returned.graph.initializer)
    assert_same_weights(returned, inline)
    feeds = make_inputs(manifest_entry(BERT_SEQ), batch=2, seq=12)
    for got, want in zip(run(out, feeds), run(inline, feeds)):
        np.testing.assert_array_equal(got, want)


def test_out_must_not_be_the_source(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes((FIXTURES / BERT_SEQ).read_bytes())
    before = sha(source)
    with pytest.raises(ValueError, match="is the source model"):
        prune(source, 0.5, out=source)
    with pytest.raises(ValueError, match="is a directory"):
        prune(source, 0.5, out=tmp_path)
    assert sha(source) == before


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1\.0"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0\.1"),
        ({"sparsity": float("nan")}, r"sparsity must be in \[0, 1\), got nan"),
        ({"sparsity": "0.5"}, r"sparsity must be a number in \[0, 1\), got '0\.5' \(str\)"),
        ({"sparsity": True}, r"sparsity must be a number"),
        ({"scope": "layer"}, r"scope must be one of \('per-layer', 'global'\), got 'layer'"),
        ({"block": (0, 4)}, r"block must be None or two positive integers .* got \(0, 4\)"),
        ({"block": (4,)}, r"block must be None or two positive integers .* got \(4,\)"),
        ({"block": (4, 1, 1)}, r"got \(4, 1, 1\)"),
        ({"block": (2.5, 1)}, r"got \(2\.5, 1\)"),
        ({"block": "4x1"}, r"got '4x1'"),
        ({"include": ["("]}, r"include pattern '\(' is not a valid regular expression"),
        ({"include": ["classifier"]}, r"include pattern 'classifier' matches no weight selected .* pass heads=True"),
        ({"include": ["no-such-weight"]}, r"include pattern 'no-such-weight' matches no weight .* weight_sparsity\(model\) lists"),
        ({"exclude": ["no-such-weight"]}, r"exclude pattern 'no-such-weight' matches no weight of the model"),
        ({"exclude": ["MatMul"]}, r"no weights left to prune: the exclude patterns remove every selected weight"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(FIXTURES / BERT_SEQ, **kwargs)


def test_include_and_exclude_narrow_the_selection():
    source = FIXTURES / DISTIL_SEQ
    original = weights(source)
    pruned = weights(prune(source, 0.5, heads=True, include=["classifier"], exclude=[r"^pre_"]))
    changed = {n for n in original if not np.array_equal(original[n], pruned[n])}
    assert changed == {"classifier.weight"}
    np.testing.assert_array_equal(pruned["classifier.weight"], numpy_prune(original["classifier.weight"], 0.5))


def test_a_model_without_prunable_weights_is_explained():
    add = tiny_model([helper.make_node("Add", ["x", "b"], ["y"])], {"b": np.ones(3, np.float32)}, {"x": [1, 3]}, ["y"])
    with pytest.raises(ValueError, match="no prunable weights: no MatMul or Gemm node reads a 2-D floating-point initializer"):
        prune(add, 0.5)
    head_only = one_matmul(np.ones((3, 2), np.float32), name="classifier.weight")
    with pytest.raises(ValueError, match=r"all its linear weights are task-head weights .* pass heads=True"):
        prune(head_only, 0.5)
    assert np.count_nonzero(weights(prune(head_only, 0.5, heads=True))["classifier.weight"]) == 3


# ----------------------------------------------------------------------------- property tests

# magnitudes from a small set, so that ties (and zeros) are common
_values = st.sampled_from([0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 1e-3])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 9), n=st.integers(1, 9), sparsity=st.floats(0, 0.999))
def test_unstructured_keeps_the_largest_and_zeroes_exactly_round_s_n(data, k, n, sparsity):
    w = np.array(data.draw(st.lists(_values | st.floats(-4, 4, width=32), min_size=k * n, max_size=k * n)), np.float32).reshape(k, n)
    got = weights(prune(one_matmul(w), sparsity))["w"]
    order = np.argsort(np.abs(w).reshape(-1), kind="stable")
    dropped = np.zeros(w.size, dtype=bool)
    dropped[order[: round(sparsity * w.size)]] = True
    dropped = dropped.reshape(w.shape)
    np.testing.assert_array_equal(got[~dropped], w[~dropped])  # the largest |w| are kept as they were
    assert (got[dropped] == 0).all() and dropped.sum() == round(sparsity * w.size)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), r=st.integers(1, 4), c=st.integers(1, 4), kb=st.integers(1, 4), nb=st.integers(1, 4), sparsity=st.floats(0, 0.999))
def test_block_pruning_drops_the_lowest_norm_blocks(data, r, c, kb, nb, sparsity):
    size = kb * r * nb * c
    w = np.array(data.draw(st.lists(_values, min_size=size, max_size=size)), np.float32).reshape(kb * r, nb * c)
    got = weights(prune(one_matmul(w), sparsity, block=(r, c)))["w"]
    np.testing.assert_array_equal(got, numpy_prune_blocks(w, (r, c), sparsity))
    zero = ~got.reshape(kb, r, nb, c).any(axis=(1, 3))
    norms = block_norms(w, (r, c))
    dropped = zero & (norms > 0)
    if dropped.any() and (~zero).any():
        assert norms[dropped].max() <= norms[~zero].min()
