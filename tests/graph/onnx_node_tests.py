"""A small backend adapter that runs the official ONNX node tests through the importer and the
NumPy reference executor.

The onnx wheel ships the node-test *definitions* (`onnx.backend.test.case.node`) rather than the
generated `backend/test/data/node` folders; `collect_testcases` builds exactly those test cases
(model, input and expected output arrays, tolerances) in memory.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from sparseinfer.graph import import_onnx, run_graph
from sparseinfer.graph.registry import normalize_domain, supported_ops


@functools.cache
def node_test_cases() -> dict:
    """Node tests whose model uses only ops we register (default domain), by test name."""
    from onnx.backend.test.case.node import collect_testcases

    ours = set(supported_ops())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some generators divide by zero on purpose
        cases = collect_testcases(None)
    return {
        c.name: c
        for c in cases
        if c.model is not None and all(normalize_domain(n.domain) == "" and n.op_type in ours for n in c.model.graph.node)
    }


def _array(x) -> np.ndarray:
    # Some generators store TensorProtos (for dtypes numpy cannot hold exactly), others arrays.
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def run_case(case) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run every data set of a node test; returns (expected, actual) pairs of outputs."""
    graph = import_onnx(case.model)
    pairs = []
    for inputs, expected in case.data_sets:
        inputs, expected = [_array(x) for x in inputs], [_array(x) for x in expected]
        # Node-test models may list optional inputs that a data set leaves out: feed by position.
        actual = run_graph(graph, dict(zip(graph.inputs, inputs)))
        pairs += list(zip(expected, actual))
    return pairs


def assert_close(expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> None:
    assert expected.dtype == actual.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    assert expected.shape == actual.shape, f"shape {actual.shape} != expected {expected.shape}"
    if expected.dtype == object or expected.dtype.kind in "US":
        assert expected.tolist() == actual.tolist()
    elif expected.dtype.kind in "iub":
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
