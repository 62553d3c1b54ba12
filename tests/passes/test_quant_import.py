"""Quantized ONNX import: onnxruntime's dynamic (MatMulInteger), QDQ and QOperator (QLinearMatMul)
forms onto the int8 kernel. Quantized fixtures are made here with onnxruntime.quantization from
the committed fp32 fixtures, and small graphs with onnx.helper. Oracles: the reference executor
on the graph before the pass (exact where the rewrite is exact), onnx.reference, and onnxruntime
on the same quantized file (tolerances stated where they are used)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from sparseinfer import Engine
from sparseinfer.graph import Graph, import_onnx, run_graph
from sparseinfer.graph.shapes import bind_dims
from sparseinfer.passes import PassContext, Sequential, default_pipeline, fold_constants, fuse_gelu
from sparseinfer.passes.quant_import import exact_int8, fuse_quantized_epilogue, import_quantized
from sparseinfer.runtime.plan import Plan
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.tolerances import INT8_FILE_MAX_DIFF_OF_RANGE

BATCH, SEQ = 3, 11
MODELS = {  # fixture → its linear layers (encoder + head)
    "bert-sequence-classification/model.onnx": 14,  # 2 x (Q, K, V, out, intermediate, output) + pooler + classifier (Gemm)
    "distilbert-question-answering/model.onnx": 13,  # 2 x 6 + qa_outputs
}
# onnxruntime's quantizers, as a user would call them
KINDS = {
    "dynamic": {"weight_type": QuantType.QInt8},
    "dynamic-per-channel": {"weight_type": QuantType.QInt8, "per_channel": True},
    "dynamic-uint8-symmetric": {"weight_type": QuantType.QUInt8, "extra_options": {"WeightSymmetric": True}},
    "qdq": {"quant_format": QuantFormat.QDQ, "per_channel": True},
    "qoperator": {"quant_format": QuantFormat.QOperator, "op_types_to_quantize": ["MatMul"]},
    "dynamic-uint8": {"weight_type": QuantType.QUInt8},  # asymmetric uint8 weights: not convertible
}


class _Calibration(CalibrationDataReader):
    def __init__(self, path: str) -> None:
        self.batches = iter([make_inputs(manifest_entry(path), 2, 8, seed=s) for s in range(2)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """make(fixture path, kind) → the path of the fixture quantized by onnxruntime (made once)."""
    root, made = tmp_path_factory.mktemp("quantized"), {}
    logging.getLogger().setLevel(logging.ERROR)  # the quantizers' "consider pre-processing" advice

    def make(path: str, kind: str) -> Path:
        if (path, kind) not in made:
            out = root / f"{path.split('/')[0]}-{kind}.onnx"
            options = dict(KINDS[kind])
            if kind.startswith("dynamic"):
                quantize_dynamic(FIXTURES / path, out, **options)
            else:
                quantize_static(FIXTURES / path, out, _Calibration(path), **options)
            made[(path, kind)] = out
        return made[(path, kind)]

    return make


def feeds_for(path: str) -> dict[str, np.ndarray]:
    return make_inputs(manifest_entry(path), BATCH, SEQ, seed=5)


def bound(model, feeds: dict) -> Graph:
    return bind_dims(import_onnx(model), {k: v.shape for k, v in feeds.items()})


def onnxruntime_run(model, feeds: dict) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def diff_of_range(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """max over outputs of max |ours - theirs| / (max(theirs) - min(theirs))."""
    return max(float(np.abs(a.astype(np.float64) - b).max() / (b.max() - b.min())) for a, b in zip(ours, theirs))


def step_kinds(engine: Engine, feeds: dict) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for row in engine.profile(feeds):
        counts[(row["op"], row["kind"])] = counts.get((row["op"], row["kind"]), 0) + 1
    return counts


def constant_weight_qlinear(model_file: Path) -> int:
    proto = onnx.load(str(model_file))
    inits = {t.name for t in proto.graph.initializer}
    return sum(1 for n in proto.graph.node if n.op_type == "QLinearMatMul" and n.input[3] in inits)


# ----------------------------------------------------------------------------- onnxruntime-quantized fixtures


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("path", list(MODELS))
def test_onnxruntime_quantized_models(quantized, path, kind):
    model_file, feeds = quantized(path, kind), feeds_for(path)
    before = bound(model_file, feeds)

    # (i) the import pass rewrites the patterns, and (ii) the reference executor agrees before and after it
    after = before.copy()
    import_quantized(after, PassContext(validate=True))
    counts = after.op_counts()
    want, got = run_graph(before, feeds), run_graph(after, feeds)
    if kind == "qdq":
        assert counts.get("QDense") == MODELS[path] and counts.get("DequantizeLinear", 0) < before.op_counts()["DequantizeLinear"]
        # QDQ computes the float32 matmul of dequantized values, QDense the exact integer product scaled once: they differ by
        # float32 rounding, which the QuantizeLinear after each matmul rounds away, except where a value sits within that
        # rounding of a half step (then one output moves by one step of that layer). Measured: 0 on both fixtures.
        assert diff_of_range(got, want) <= INT8_FILE_MAX_DIFF_OF_RANGE
    else:
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)  # exact: the same integers, the same float32 operations in the same order
        if kind == "qoperator":
            assert "QDense" not in counts and counts["QLinearMatMul"] == before.op_counts()["QLinearMatMul"]
        elif kind == "dynamic-uint8":
            assert "QDense" not in counts and counts["MatMulInteger"] == MODELS[path]  # (v) left as it is
        else:
            assert counts.get("QDense") == MODELS[path] and "MatMulInteger" not in counts

    # (iii) the Engine matches onnxruntime on the same file, and (iv) the int8 kernel runs
    engine = Engine(model_file)
    ours = engine.run(feeds)
    ratio = diff_of_range(ours, onnxruntime_run(model_file, feeds))
    assert ratio <= INT8_FILE_MAX_DIFF_OF_RANGE, f"{path} ({kind}): max |ours - onnxruntime| = {ratio:.2e} of the output range"
    kinds = step_kinds(engine, feeds)
    if kind == "qoperator":
        n, total = constant_weight_qlinear(model_file), before.op_counts()["QLinearMatMul"]
        # the attention products (both operands computed at run time) stay on the reference executor
        assert n == MODELS[path] - (2 if "bert-seq" in path else 0)  # QOperator was asked for MatMul only: BERT's Gemm head stays fp32
        assert kinds[("QLinearMatMul", "kernel")] == n
        assert kinds.get(("QLinearMatMul", "reference"), 0) == total - n
    elif kind == "dynamic-uint8":
        assert kinds[("MatMulInteger", "reference")] == MODELS[path] and ("QDense", "kernel") not in kinds
    else:
        # Q, K and V of each of the 2 layers merge into one QDense where attention fuses (not in QDQ files: the
        # attention products there are quantized too, which the Attention kernel does not do)
        merged = MODELS[path] - (0 if kind == "qdq" else 4)
        assert kinds[("QDense", "kernel")] == merged and not any(op == "QDense" and k != "kernel" for op, k in kinds)
        assert len([r for r in engine.describe() if r["quantize"] == "int8"]) == merged


def test_dynamic_model_epilogue_and_attention_fuse(quantized):
    path = "bert-sequence-classification/model.onnx"
    feeds = feeds_for(path)
    graph = bound(quantized(path, "dynamic"), feeds)
    default_pipeline()(graph, PassContext(validate=True))
    counts = graph.op_counts()
    # bias, GELU and residual Adds went into the QDense epilogues; Q, K and V feed a fused Attention and are one QDense
    assert counts["QDense"] == 14 - 4 and counts["Attention"] == 2 and "Gelu" not in counts and "Mul" not in counts
    qdense = [n for n in graph.nodes if n.op == "QDense"]
    acts = sorted(n.attrs["activation"] for n in qdense)
    assert acts.count("gelu") == 2 and acts.count("tanh") == 1  # intermediate layers, pooler
    assert sum(1 for n in qdense if len(n.inputs) > 6 and n.inputs[6]) == 4  # attention output + output: residual Adds
    qkv = [n for n in qdense if graph.const(n.inputs[1]).shape[1] == 3 * 32]
    assert len(qkv) == 2 and all(graph.const(n.inputs[2]).shape == (96,) and graph.const(n.inputs[5]).shape == (96,) for n in qkv)
    unmerged = bound(quantized(path, "dynamic"), feeds)
    default_pipeline()(unmerged, PassContext(disabled={"merge_qkv"}))
    np.testing.assert_array_equal(run_graph(graph, feeds)[0], run_graph(unmerged, feeds)[0])  # the merge is exact
    ref = run_graph(bound(quantized(path, "dynamic"), feeds), feeds)
    np.testing.assert_allclose(Plan(graph).run(feeds)[0], ref[0], rtol=0, atol=INT8_FILE_MAX_DIFF_OF_RANGE * np.ptp(ref[0]))


# ----------------------------------------------------------------------------- small graphs


def model(nodes, inputs: dict, outputs: dict, inits: dict, opset: int = 17) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()]
    g = helper.make_graph(nodes, "q", ins, outs, [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


node = helper.make_node
F32 = TensorProto.FLOAT
B, S, K, N = 2, 5, 37, 45  # K pads to 40 in the kernel, N leaves a partial 32-column panel


def dynamic_model(rng, per_channel: bool, weight_dtype=np.int8) -> onnx.ModelProto:
    """Two MatMulIntegers sharing one DynamicQuantizeLinear; the first with bias, ReLU and a residual."""
    if weight_dtype == np.int8:
        w1, w2 = (rng.integers(-127, 128, (K, N)).astype(np.int8) for _ in range(2))
        z1 = np.zeros(N, np.int8) if per_channel else np.int8(0)
    else:  # symmetric uint8: zero point 128
        w1, w2 = (rng.integers(1, 256, (K, N)).astype(np.uint8) for _ in range(2))
        z1 = np.full(N, 128, np.uint8) if per_channel else np.uint8(128)
    s1 = rng.uniform(0.001, 0.01, N).astype(np.float32) if per_channel else np.float32(0.004)
    inits = {"w1": w1, "z1": z1, "s1": s1, "w2": w2, "s2": np.float32(0.003), "b1": rng.standard_normal(N).astype(np.float32)}
    if weight_dtype == np.uint8:
        inits["z2"] = np.uint8(128)
    nodes = [
        node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        node("MatMulInteger", ["xq", "w1", "xz", "z1"], ["acc1"]),
        node("Cast", ["acc1"], ["accf1"], to=F32),
        node("Mul", ["xs", "s1"], ["scale1"]),
        node("Mul", ["accf1", "scale1"], ["y1"]),
        node("Add", ["b1", "y1"], ["z"]),
        node("Relu", ["z"], ["a"]),
        node("Add", ["a", "r"], ["out1"]),
        node("MatMulInteger", ["xq", "w2", "xz"] + (["z2"] if weight_dtype == np.uint8 else []), ["acc2"]),
        node("Cast", ["acc2"], ["accf2"], to=F32),
        node("Mul", ["s2", "xs"], ["scale2"]),
        node("Mul", ["scale2", "accf2"], ["out2"]),
    ]
    return model(nodes, {"x": (F32, [B, S, K]), "r": (F32, [B, S, N])}, {"out1": F32, "out2": F32}, inits)


def small_feeds(m: onnx.ModelProto, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in m.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == F32:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feeds[vi.name] = rng.integers(-128, 128, shape).astype(np.int8)
    return feeds


def imported(m: onnx.ModelProto) -> tuple[Graph, Graph]:
    """(the graph as imported, after import_quantized and the epilogue fusion)."""
    before = import_onnx(m)
    after = before.copy()
    Sequential([import_quantized, fold_constants, fuse_gelu, fuse_quantized_epilogue])(after, PassContext(validate=True))
    return before, after


def kernel_steps(graph: Graph) -> dict[str, str]:
    return {st.node.op: st.kind for st in Plan(graph).steps}


@pytest.mark.parametrize("weight_dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_pattern(per_channel, weight_dtype):
    m = dynamic_model(np.random.default_rng(1), per_channel, weight_dtype)
    feeds = small_feeds(m)
    feeds["x"][0, 2] = 40.0  # one outlier sets the tensor's range: per-tensor, not per-row, quantization
    before, after = imported(m)
    q = [n for n in after.nodes if n.op == "QDense"]
    assert [n.op for n in after.nodes] == ["QDense", "QDense"]
    assert q[0].attrs["activation"] == "relu" and q[0].inputs[3:] == ("", "", q[0].inputs[5], "r")  # bias, ReLU, residual
    assert after.const(q[0].inputs[1]).dtype == np.int8 and after.const(q[0].inputs[2]).shape == (N,)
    want, onnx_ref, got = run_graph(before, feeds), ReferenceEvaluator(m).run(None, feeds), run_graph(after, feeds)
    for w, o, g in zip(want, onnx_ref, got):
        np.testing.assert_array_equal(g, w)  # the rewrite is exact on the reference executor …
        np.testing.assert_array_equal(g, o)  # … and onnx.reference agrees with it
    # the int8 kernel computes the same bits: the same integers, then the same float32 operations in the same order
    assert kernel_steps(after) == {"QDense": "kernel"}
    for g, w in zip(Plan(after).run(feeds), want):
        np.testing.assert_array_equal(g, w)
    for g, w in zip(Engine(m).run(feeds), onnxruntime_run(m, feeds)):
        np.testing.assert_array_equal(g, w)  # and onnxruntime too (measured exact; its DynamicQuantizeLinear rounds the same)


def qdq_model(rng, act_dtype, per_channel: bool) -> onnx.ModelProto:
    """MatMul and Gemm(transB=1, bias = DequantizeLinear(int32)) on QuantizeLinear→DequantizeLinear inputs."""
    xz = np.uint8(131) if act_dtype == np.uint8 else np.int8(3)
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    wt = rng.integers(-127, 128, (N, K)).astype(np.int8)  # Gemm transB: [N, K], per channel on axis 0
    ws = rng.uniform(0.001, 0.01, N).astype(np.float32) if per_channel else np.float32(0.005)
    wz = np.zeros(N, np.int8) if per_channel else np.int8(0)
    inits = {"xs": np.float32(0.05), "xz": xz, "w": w, "ws": ws, "wz": wz, "wt": wt, "bq": rng.integers(-500, 500, N).astype(np.int32)}
    inits["bs"] = (np.float32(0.05) * ws).astype(np.float32)  # as quantizers write it (onnxruntime's QGemm assumes it)
    nodes = [
        node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
        node("MatMul", ["xd", "wd"], ["out1"]),
        node("QuantizeLinear", ["x2", "xs", "xz"], ["xq2"]),
        node("DequantizeLinear", ["xq2", "xs", "xz"], ["xd2"]),
        node("DequantizeLinear", ["wt", "ws", "wz"], ["wtd"], axis=0),
        node("DequantizeLinear", ["bq", "bs"], ["bias"], axis=0),
        node("Gemm", ["xd2", "wtd", "bias"], ["out2"], transB=1),
    ]
    return model(nodes, {"x": (F32, [B, S, K]), "x2": (F32, [B * S, K])}, {"out1": F32, "out2": F32}, inits)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act_dtype", [np.uint8, np.int8])
def test_qdq_pattern(act_dtype, per_channel):
    m = qdq_model(np.random.default_rng(2), act_dtype, per_channel)
    feeds = small_feeds(m)
    before, after = imported(m)
    q = [n for n in after.nodes if n.op == "QDense"]
    assert len(q) == 2 and not any(n.op in ("MatMul", "Gemm") for n in after.nodes)
    assert all(after.const(n.inputs[4]).dtype == np.uint8 for n in q)  # int8 activations became uint8 + 128
    assert after.const(q[1].inputs[5]) is not None  # the Gemm's dequantized bias is the epilogue's
    # QDQ is a float32 matmul of dequantized values; QDense computes it exactly in integers and scales once:
    # float32 rounding of a K-term dot product apart (rtol 1e-5 with an atol for cancellation)
    for g, w in zip(run_graph(after, feeds), run_graph(before, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    assert kernel_steps(after)["QDense"] == "kernel"
    got = Plan(after).run(feeds)
    for g, w in zip(got, run_graph(after, feeds)):
        np.testing.assert_array_equal(g, w)  # static activation quantization: the kernel is exact on the QDense semantics
    for g, w in zip(Engine(m).run(feeds), onnxruntime_run(m, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def qlinear_model(rng, act_dtype, weight: str) -> onnx.ModelProto:
    xz = np.uint8(120) if act_dtype == np.uint8 else np.int8(-5)
    if weight == "uint8-symmetric":
        w, wz = rng.integers(0, 256, (K, N)).astype(np.uint8), np.uint8(128)
    else:
        w, wz = rng.integers(-128, 128, (K, N)).astype(np.int8), np.zeros(N, np.int8)
    inits = {"xs": np.float32(0.05), "xz": xz, "w": w, "ws": rng.uniform(0.001, 0.01, N).astype(np.float32), "wz": wz}
    inits |= {"ys": np.float32(0.7), "yz": np.array(100 if act_dtype == np.uint8 else -20, act_dtype)}
    nodes = [
        node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        node("QLinearMatMul", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"]),
        node("DequantizeLinear", ["yq", "ys", "yz"], ["out"]),
        node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),  # a MatMulInteger outside the dynamic pattern
    ]
    return model(nodes, {"x": (F32, [B, S, K])}, {"out": F32, "acc": TensorProto.INT32}, inits)


@pytest.mark.parametrize("weight", ["int8", "uint8-symmetric"])
@pytest.mark.parametrize("act_dtype", [np.uint8, np.int8])
def test_qlinear_matmul_and_matmul_integer_run_exactly_on_the_kernel(act_dtype, weight):
    m = qlinear_model(np.random.default_rng(4), act_dtype, weight)
    feeds = small_feeds(m)
    feeds["x"] *= 3
    before, after = imported(m)
    for n in after.nodes:
        if n.op in ("QLinearMatMul", "MatMulInteger"):
            b = n.inputs[3] if n.op == "QLinearMatMul" else n.inputs[1]
            assert after.const(b).dtype == np.int8  # converted (or already) int8 with zero point 0
    want = run_graph(before, feeds)
    for g, w in zip(run_graph(after, feeds), want):
        np.testing.assert_array_equal(g, w)
    steps = kernel_steps(after)
    assert steps["QLinearMatMul"] == "kernel" and steps["MatMulInteger"] == "kernel"
    for g, w in zip(Plan(after).run(feeds), want):
        np.testing.assert_array_equal(g, w)  # exact int32 products, the reference's own requantization
    if act_dtype == np.int8 and weight != "int8":
        return  # onnxruntime has no int8 x uint8 kernels
    # onnxruntime requantizes in float32, the ONNX reference in float64: at most one output step apart
    theirs = onnxruntime_run(m, feeds)
    np.testing.assert_allclose(Engine(m).run(feeds)[0], theirs[0], rtol=0, atol=0.7 * 1.0001)
    np.testing.assert_array_equal(Engine(m).run(feeds)[1], theirs[1])


# ----------------------------------------------------------------------------- what stays on the reference executor


def _asymmetric_uint8(rng):
    m = dynamic_model(rng, per_channel=False, weight_dtype=np.uint8)
    for t in m.graph.initializer:
        if t.name == "z1":
            t.CopyFrom(numpy_helper.from_array(np.uint8(100), "z1"))  # values 1..255 minus 100 reach 155 > 127
    return m


def _runtime_weight(rng):
    m = dynamic_model(rng, per_channel=True)
    w1 = next(t for t in m.graph.initializer if t.name == "w1")
    m.graph.initializer.remove(w1)
    m.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.INT8, [K, N]))
    return m


def _per_k_weight_scale(rng):
    m = qdq_model(rng, np.uint8, per_channel=False)
    extra = {"wsk": rng.uniform(0.001, 0.01, K).astype(np.float32), "wzk": np.zeros(K, np.int8)}
    m.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in extra.items())
    for n in m.graph.node:
        if n.output[0] == "wd":  # scales along K (axis 0 of a [K, N] weight): not one per output channel
            n.input[1], n.input[2] = "wsk", "wzk"
            n.attribute[0].i = 0
    return m


def _different_qdq_scales(rng):
    m = qdq_model(rng, np.uint8, per_channel=True)
    m.graph.initializer.append(numpy_helper.from_array(np.float32(0.04), "xs2"))
    next(n for n in m.graph.node if n.output[0] == "xd").input[1] = "xs2"
    return m


def _qlinear_runtime_weight(rng):
    m = qlinear_model(rng, np.uint8, "int8")
    m.graph.node.insert(0, node("Identity", ["w"], ["w_copy"]))
    next(n for n in m.graph.node if n.op_type == "QLinearMatMul").input[3] = "w_copy"
    m.graph.input.append(helper.make_tensor_value_info("w_in", TensorProto.INT8, [K, N]))
    m.graph.node[0].input[0] = "w_in"
    return m


@pytest.mark.parametrize(
    "make, stays, onnxruntime_runs",
    [
        (_asymmetric_uint8, "MatMulInteger", True),
        (_runtime_weight, "MatMulInteger", True),
        (_per_k_weight_scale, "MatMul", False),  # onnxruntime fuses it to a MatMulIntegerToFloat that rejects per-K zero points
        (_different_qdq_scales, "MatMul", True),
        (_qlinear_runtime_weight, "QLinearMatMul", True),
    ],
)
def test_what_the_kernel_cannot_run_stays_and_gives_the_right_answer(make, stays, onnxruntime_runs):
    m = make(np.random.default_rng(6))
    feeds = small_feeds(m)
    before, after = imported(m)
    assert stays in after.op_counts()
    engine = Engine(m)
    ours = engine.run(feeds)
    graph = next(iter(engine._plans.values())).graph
    if stays == "MatMul":  # the dequantized weight was folded: an fp32 Dense, on the fp32 kernel
        assert not any(n.op == "QDense" and n.inputs[1] == "w" for n in graph.nodes)
    want = run_graph(before, feeds)
    theirs = onnxruntime_run(m, feeds) if onnxruntime_runs else want
    for o, w, t in zip(ours, want, theirs):
        if w.dtype.kind == "f":  # fp32 kernels (the folded Dense) where the quantized matmul is not rewritten
            np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
            np.testing.assert_allclose(o, t, rtol=1e-4, atol=1e-4 * np.abs(t).max())
        else:
            np.testing.assert_array_equal(o, w)
            assert np.abs(o.astype(np.int64) - t).max() <= 1  # QLinearMatMul requantization: float32 vs float64 rounding


def test_exact_int8_conversion():
    w = np.array([[0, 255], [128, 1]], np.uint8)
    np.testing.assert_array_equal(exact_int8(w, np.array([128, 128], np.uint8)), [[-128, 127], [0, -127]])
    assert exact_int8(w, np.array([128, 100], np.uint8)) is None  # 255 - 100 = 155 does not fit
    i8 = np.array([[-128, 127]], np.int8)
    np.testing.assert_array_equal(exact_int8(i8, None), i8)
    assert exact_int8(i8, np.array([1, 0], np.int8)) is None  # -129
