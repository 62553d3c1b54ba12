"""Importer behaviour beyond the node tests: errors people will hit, old op-set forms, external data."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparseinfer.graph import ModelLoadError, UnsupportedOpError, import_onnx, run_graph, supported_ops
from tests.conftest import FIXTURES

BERT = FIXTURES / "bert-sequence-classification"


def _model(nodes, inputs, outputs, initializers=(), opset=17, **kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    kw.setdefault("ir_version", 8)  # what onnxruntime in the test extras reads
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)


def _vi(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_unsupported_op_names_op_node_opset_and_supported_ops():
    m = _model([helper.make_node("HardSwish", ["x"], ["y"], name="act_7")], [_vi("x")], [_vi("y")], opset=16)
    with pytest.raises(UnsupportedOpError) as err:
        import_onnx(m)
    msg = str(err.value)
    assert "'HardSwish'" in msg and "act_7" in msg and "opset 16" in msg
    assert "MatMul" in msg and "LayerNormalization" in msg  # the supported list


def test_custom_domain_op_is_unsupported_with_domain_named():
    m = _model([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")], [_vi("x")], [_vi("y")])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedOpError, match="com.microsoft"):
        import_onnx(m)


def test_unknown_attribute_is_refused():
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=1, temperature=2.0)], [_vi("x")], [_vi("y")])
    with pytest.raises(UnsupportedOpError, match="temperature"):
        import_onnx(m)


def test_opset_older_than_any_registration():
    m = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y"])], [_vi("x"), _vi("s", shape=(3,))], [_vi("y")], opset=16)
    with pytest.raises(UnsupportedOpError, match="LayerNormalization"):
        import_onnx(m)


def test_garbage_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07 this is not protobuf \xff\xfe" * 10)
    with pytest.raises(ModelLoadError, match="ONNX"):
        import_onnx(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not an ONNX model|truncated"):
        import_onnx(p)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file_gives_clear_error(tmp_path, fraction):
    data = (BERT / "model.onnx").read_bytes()
    p = tmp_path / "model.onnx"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match="truncated"):
        import_onnx(p)


def test_missing_path_and_directory_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_onnx(tmp_path / "nope.onnx")
    (tmp_path / "other.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="other.onnx"):
        import_onnx(tmp_path)


def test_directory_and_file_and_proto_give_the_same_graph():
    a, b = import_onnx(BERT), import_onnx(BERT / "model.onnx")
    c = import_onnx(onnx.load(str(BERT / "model.onnx")))
    assert [str(n) for n in a.nodes] == [str(n) for n in b.nodes] == [str(n) for n in c.nodes]


def test_external_data(tmp_path):
    """Weights stored beside the model (as exporters do above 2 GB) are read."""
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x")], [_vi("y", shape=(2, 4))], [numpy_helper.from_array(w, "w")])
    onnx.save(
        m, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    assert (tmp_path / "weights.bin").exists()
    x = np.ones((2, 3), np.float32)
    (y,) = run_graph(import_onnx(tmp_path), [x])
    np.testing.assert_allclose(y, x @ w, rtol=1e-6)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="external"):
        import_onnx(tmp_path)


def test_input_shape_overrides():
    g = import_onnx(BERT, input_shapes={"input_ids": (1, 16)})
    assert g.info("input_ids").shape == (1, 16)
    assert g.info("attention_mask").shape == ("batch", "sequence")
    with pytest.raises(ValueError, match="not inputs"):
        import_onnx(BERT, input_shapes={"ids": (1, 16)})
    with pytest.raises(ValueError, match="rank"):
        import_onnx(BERT, input_shapes={"input_ids": (1, 16, 1)})


@pytest.mark.parametrize(
    "opset, nodes",
    [
        (11, [helper.make_node("Unsqueeze", ["x"], ["a"], axes=[0]),
              helper.make_node("ReduceMean", ["a"], ["b"], axes=[-1], keepdims=1),
              helper.make_node("Split", ["x"], ["c", "d"], axis=1, split=[1, 2])]),
        (9, [helper.make_node("Slice", ["x"], ["a"], starts=[0, 1], ends=[2, 99], axes=[0, 1]),
             helper.make_node("Clip", ["x"], ["b"], min=0.5, max=4.0),
             helper.make_node("Unsqueeze", ["a"], ["c"], axes=[1])]),
    ],
)  # fmt: skip
def test_old_opset_attribute_forms_become_inputs(opset, nodes):
    """Before op-set 13 some ops took axes/split/starts/min as attributes; the IR holds one form
    (constant inputs), and results match onnxruntime on the original model."""
    outputs = [o for n in nodes for o in n.output]
    m = _model(nodes, [_vi("x")], [_vi(o, shape=None) for o in outputs], opset=opset)
    g = import_onnx(m)
    for node in g.nodes:
        assert not {"axes", "split", "starts", "ends", "min", "max"} & set(node.attrs), node
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ours = run_graph(g, [x])
    theirs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_op_count_is_what_the_readme_and_issue_report():
    # Guard against silently dropping a registration: the BERT-family set must stay registered.
    needed = {
        "Shape", "Gather", "Unsqueeze", "Concat", "Expand", "Where", "Range", "ConstantOfShape", "LayerNormalization", "Erf",
        "IsNaN", "Softmax", "Gemm", "Flatten", "Tanh", "Split", "Pow", "Sqrt", "ReduceMean", "Cast", "CastLike",
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "CumSum",
        "Slice", "Squeeze", "Reshape", "Transpose", "MatMul", "Add", "Sub", "Mul", "Div", "Equal", "Not", "Relu", "Constant",
    }  # fmt: skip
    assert needed <= set(supported_ops())
