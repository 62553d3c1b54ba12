"""sparseinfer.quantize: the int8 ONNX file it writes runs on onnxruntime, stays close to the fp32
model, holds the engine's own weight quantization, selects layers as the quantize_int8 pass does,
imports back onto the int8 kernel, and bad arguments are clear errors. Oracles: onnxruntime on
the fp32 fixture and on the written file, kernels.int8.quantize_weight for the weights."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import sparseinfer
from sparseinfer import Engine
from sparseinfer.kernels.int8 import quantize_weight
from tests.conftest import FIXTURES, make_inputs, manifest_entry
from tests.tolerances import INT8_FILE_MAX_DIFF_OF_RANGE, INT8_PER_TENSOR_MODEL_MAX_DIFF_OF_RANGE

BERT = "bert-sequence-classification/model.onnx"  # Gemm heads (pooler, classifier)
MODELS = {BERT: 14, "distilbert-question-answering/model.onnx": 13, "roberta-token-classification/model.onnx": 13}


def run(model, feeds: dict) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def diff_of_range(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    return max(float(np.abs(a.astype(np.float64) - b).max() / (b.max() - b.min())) for a, b in zip(ours, theirs))


def ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("layers", ["encoder", "all"])
@pytest.mark.parametrize("path", list(MODELS))
def test_written_model_runs_on_onnxruntime_and_imports_back_onto_the_int8_kernel(tmp_path, path, layers):
    out = tmp_path / "int8.onnx"
    proto = sparseinfer.quantize(FIXTURES / path, out=out, layers=layers)
    count = 12 if layers == "encoder" else MODELS[path]  # 2 layers x (Q, K, V, out, intermediate, output) [+ heads]
    assert ops(proto)["MatMulInteger"] == count and ops(onnx.load(str(out)))["MatMulInteger"] == count
    # one DynamicQuantizeLinear per quantized input: Q, K and V share theirs (4 per layer, + 1 per head input)
    assert ops(proto)["DynamicQuantizeLinear"] == 8 + (count - 12)
    feeds = make_inputs(manifest_entry(path), 3, 11, seed=7)
    fp32, int8 = run(FIXTURES / path, feeds), run(out, feeds)
    # per-tensor activations and per-channel int8 weights against fp32 (measured 0.7-1.7 % of the range)
    assert 0 < diff_of_range(int8, fp32) <= INT8_PER_TENSOR_MODEL_MAX_DIFF_OF_RANGE
    engine = Engine(out)
    ratio = diff_of_range(engine.run(feeds), int8)
    assert ratio <= INT8_FILE_MAX_DIFF_OF_RANGE, f"max |ours - onnxruntime| on the written file: {ratio:.2e} of the output range"
    kinds = Counter((r["op"], r["kind"]) for r in engine.profile(feeds))
    # every MatMulInteger is on the int8 kernel; Q, K and V of each of the 2 layers are merged into one
    assert kinds[("QDense", "kernel")] == count - 4 and not kinds[("QDense", "reference")] and not kinds[("MatMulInteger", "reference")]


def test_weights_are_the_kernels_quantization_and_heads_stay_fp32():
    source = onnx.load(str(FIXTURES / BERT))
    before = initializers(source)
    proto = sparseinfer.quantize(source)
    after = initializers(proto)
    for mm in (n for n in proto.graph.node if n.op_type == "MatMulInteger"):
        w_name = mm.input[1].removesuffix("_int8")
        want_q, want_s = quantize_weight(before[w_name])
        wq = after[mm.input[1]]
        assert wq.dtype == np.int8 and np.array_equal(wq, want_q) and len(mm.input) == 3  # symmetric: no weight zero point
        assert np.array_equal(after[f"{w_name}_scale"], want_s)
        assert w_name not in after  # the fp32 weight is gone
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(after)  # the task head stays fp32 by default
    assert source == onnx.load(str(FIXTURES / BERT))  # the caller's proto is not modified


def test_layer_patterns_and_exclusions():
    query = sparseinfer.quantize(FIXTURES / BERT, layers=[r"attention\.self\.query"])
    assert ops(query)["MatMulInteger"] == 2  # matched through the bias name (the weight is onnx::MatMul_*)
    assert ops(sparseinfer.quantize(FIXTURES / BERT, exclude=["intermediate", "output.dense"]))["MatMulInteger"] == 6
    assert ops(sparseinfer.quantize(FIXTURES / BERT, layers="all", exclude=["classifier"]))["MatMulInteger"] == 13
    assert "classifier.weight" not in initializers(sparseinfer.quantize(FIXTURES / BERT, layers="all"))
    pooler = sparseinfer.quantize(FIXTURES / BERT, layers=["pooler"])  # a head, chosen by name
    assert ops(pooler)["MatMulInteger"] == 1 and "bert.pooler.dense.weight" not in initializers(pooler)


def test_pruned_then_quantized_keeps_the_zeros(tmp_path):
    pruned = sparseinfer.prune(FIXTURES / BERT, sparsity=0.75, block=(4, 1))
    proto = sparseinfer.quantize(pruned, out=tmp_path / "m.onnx")
    inits, fp32 = initializers(proto), initializers(pruned)
    for mm in (n for n in proto.graph.node if n.op_type == "MatMulInteger"):
        wq, w = inits[mm.input[1]], fp32[mm.input[1].removesuffix("_int8")]
        assert np.mean(w == 0) == 0.75 and not wq[w == 0].any()  # a pruned weight quantizes to 0
    feeds = make_inputs(manifest_entry(BERT), 2, 9, seed=1)
    assert diff_of_range(Engine(tmp_path / "m.onnx").run(feeds), run(tmp_path / "m.onnx", feeds)) <= INT8_FILE_MAX_DIFF_OF_RANGE


def _opset10():
    m = onnx.load(str(FIXTURES / BERT))
    m.opset_import[0].version = 10
    return m


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": "decoder"}, "layers must be one of"),
        ({"layers": []}, "non-empty list"),
        ({"layers": [3]}, "list of regular expressions"),
        ({"layers": ["("]}, r"layers: '\(' is not a valid regular expression"),
        ({"exclude": ["(["]}, r"exclude: '\(\[' is not a valid regular expression"),
        ({"exclude": 7}, "exclude must be a list"),
        ({"layers": ["no-such-layer"]}, "no linear layer selected"),
        ({"layers": "all", "exclude": ["."]}, "no linear layer selected"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparseinfer.quantize(FIXTURES / BERT, **kwargs)


def test_bad_models_and_outputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="op-set 10.*opset ≥ 11"):
        sparseinfer.quantize(_opset10())
    once = sparseinfer.quantize(FIXTURES / BERT, layers="all")
    with pytest.raises(ValueError, match="already quantized model"):
        sparseinfer.quantize(once)
    source = FIXTURES / BERT
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="is the source model"):
        sparseinfer.quantize(source, out=source)
    with pytest.raises(ValueError, match="is a directory"):
        sparseinfer.quantize(source, out=tmp_path)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


def test_a_shared_weight_is_quantized_once():
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime reads
    proto = sparseinfer.quantize(model)  # no LayerNorm: every layer counts as encoder
    assert ops(proto)["MatMulInteger"] == 2 and ops(proto)["DynamicQuantizeLinear"] == 2
    assert sorted(initializers(proto)) == ["w_int8", "w_scale"]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    np.testing.assert_array_equal(Engine(proto).run(feeds)[0], run(proto, feeds)[0])
