"""Fusions: each pattern is built with onnx.helper in every variant the fusion claims to handle,
optimised the way `default_pipeline` does (constants folded first, with the shapes bound), and
checked twice: the Expected structure (op counts, the fused node's attributes and inputs) and the
outputs of both graphs on the NumPy reference executor. Negative cases must stay unfused and keep
their outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto

from sparseinfer.graph.reference import ENGINE_DOMAIN
from sparseinfer.passes import eliminate_dead_code, fold_constants, fuse_attention, fuse_dense, fuse_gelu, fuse_layernorm
from tests.passes.builders import assert_same_outputs, bind, f32, i64, node, only, onnx_graph, optimize, random_feeds

RNG = np.random.default_rng(1234)
HIDDEN = 8
X_SHAPE = ["batch", "seq", HIDDEN]


def weights(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.5).astype(np.float32)


def wide_feeds(graph, scale: float = 3.0) -> dict[str, np.ndarray]:
    """Inputs spread over [-3σ, 3σ]-ish so the nonlinear parts of GELU/tanh are exercised."""
    return {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in random_feeds(graph).items()}


# ----------------------------------------------------------------------------- LayerNorm

EPS = 1e-5
GAMMA, BETA = weights(HIDDEN) + 1.0, weights(HIDDEN)


def layernorm_model(
    square: str = "pow",
    affine: str = "gamma_beta",
    axis: int = -1,
    swapped: bool = False,
    x_shape: list = X_SHAPE,
    gamma: np.ndarray = GAMMA,
    extra: tuple = (),
    extra_outputs: tuple = (),
):
    """The decomposed LayerNorm of opset < 17 exports:
    d = x - ReduceMean(x); y = d / Sqrt(ReduceMean(d²) + eps) [* gamma] [+ beta].
    `square` is Pow(d, 2) or Mul(d, d); `swapped` writes the commutative operands the other way
    round (eps + var, gamma * n, beta + m)."""
    sq = node("Pow", ["d", "two"], ["sq"]) if square == "pow" else node("Mul", ["d", "d"], ["sq"])
    nodes = [
        node("ReduceMean", ["x", "axes"], ["mean"]),
        node("Sub", ["x", "mean"], ["d"]),
        sq,
        node("ReduceMean", ["sq", "axes"], ["var"]),
        node("Add", ["eps", "var"] if swapped else ["var", "eps"], ["var_eps"]),
        node("Sqrt", ["var_eps"], ["std"]),
        node("Div", ["d", "std"], ["norm" if affine != "none" else "y"]),
    ]
    inits = {"axes": i64([axis]), "two": f32(2.0), "eps": f32(EPS)}
    if affine in ("gamma", "gamma_beta"):
        nodes.append(node("Mul", ["gamma", "norm"] if swapped else ["norm", "gamma"], ["scaled" if affine == "gamma_beta" else "y"]))
        inits["gamma"] = gamma
    if affine == "gamma_beta":
        nodes.append(node("Add", ["beta", "scaled"] if swapped else ["scaled", "beta"], ["y"]))
        inits["beta"] = BETA
    return onnx_graph(nodes + list(extra), {"x": x_shape}, ["y", *extra_outputs], inits)


def layernorm_graph(**kwargs):
    return bind(layernorm_model(**kwargs), x=(2, 3, HIDDEN))


LN_PASSES = (fold_constants, fuse_layernorm, eliminate_dead_code)


@pytest.mark.parametrize("swapped", [False, True], ids=["plain", "swapped"])
@pytest.mark.parametrize("affine", ["none", "gamma", "gamma_beta"])
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_layernorm_fuses(square, affine, swapped):
    before = layernorm_graph(square=square, affine=affine, swapped=swapped)
    after = optimize(before, *LN_PASSES)

    assert after.op_counts() == {"LayerNormalization": 1}
    ln = only(after, "LayerNormalization")
    assert ln.attrs["axis"] == -1
    assert ln.attrs["epsilon"] == pytest.approx(float(np.float32(EPS)), rel=1e-6)
    assert ln.inputs[0] == "x" and ln.outputs == ("y",)
    np.testing.assert_array_equal(after.const(ln.inputs[1]), GAMMA if affine != "none" else np.ones(HIDDEN, np.float32))
    if affine == "gamma_beta":
        np.testing.assert_array_equal(after.const(ln.inputs[2]), BETA)
    else:
        assert len(ln.inputs) == 2
    assert_same_outputs(before, after, wide_feeds(before))


def test_layernorm_flattens_a_broadcast_gamma():
    """A gamma stored as [1, 1, n] (same rank as x) becomes the 1-D scale LayerNormalization wants."""
    before = layernorm_graph(affine="gamma", gamma=GAMMA.reshape(1, 1, HIDDEN))
    after = optimize(before, *LN_PASSES)
    ln = only(after, "LayerNormalization")
    np.testing.assert_array_equal(after.const(ln.inputs[1]), GAMMA)
    assert_same_outputs(before, after)


def test_layernorm_over_a_non_last_axis_does_not_fuse():
    before = layernorm_graph(axis=1)
    after = optimize(before, *LN_PASSES)
    assert after.op_counts() == before.op_counts()
    assert_same_outputs(before, after)


def test_layernorm_whose_centred_value_is_used_elsewhere_does_not_fuse():
    """d = x - mean also feeds a third node (exported as a second output)."""
    before = layernorm_graph(affine="none", extra=[node("Neg", ["d"], ["neg_d"])], extra_outputs=["neg_d"])
    after = optimize(before, *LN_PASSES)
    assert "LayerNormalization" not in after.op_counts()
    assert_same_outputs(before, after)


def test_layernorm_without_gamma_over_a_symbolic_last_dim_does_not_crash():
    model = layernorm_model(affine="none", x_shape=["batch", "hidden"])
    after = optimize(model, *LN_PASSES)
    assert_same_outputs(bind(model, x=(3, HIDDEN)), bind(after, x=(3, HIDDEN)))


def test_layernorm_keeps_the_shape_a_higher_rank_gamma_broadcasts_to():
    before = bind(layernorm_model(affine="gamma", x_shape=["batch", HIDDEN], gamma=GAMMA.reshape(1, 1, HIDDEN)), x=(3, HIDDEN))
    after = optimize(before, *LN_PASSES)
    assert_same_outputs(before, after)


# ----------------------------------------------------------------------------- GELU

SQRT2 = math.sqrt(2.0)


def _tail(tail: str, half: float) -> tuple[list, dict]:
    """0.5 * x * (1 + inner) where `p` = 1 + inner, in the three orders exporters write."""
    if tail == "x_p_then_half":  # (x * (1 + ·)) * 0.5 — TorchScript
        nodes = [node("Mul", ["x", "p"], ["xp"]), node("Mul", ["xp", "half"], ["y"])]
    elif tail == "half_x_first":  # (0.5 * x) * (1 + ·)
        nodes = [node("Mul", ["x", "half"], ["hx"]), node("Mul", ["hx", "p"], ["y"])]
    else:  # x * (0.5 * (1 + ·)) — dynamo
        nodes = [node("Mul", ["half", "p"], ["hp"]), node("Mul", ["x", "hp"], ["y"])]
    return nodes, {"half": f32(half)}


TAILS = ["x_p_then_half", "half_x_first", "x_times_half_p"]


def gelu_erf_graph(scale: str, tail: str, half: float = 0.5, erf_const: float | None = None):
    """0.5 * x * (1 + erf(x / sqrt 2)), with x / sqrt 2 written as Div(x, sqrt 2) or Mul(x, 1/sqrt 2)."""
    c = erf_const if erf_const is not None else (SQRT2 if scale == "div" else 1.0 / SQRT2)
    nodes = [
        node("Div" if scale == "div" else "Mul", ["x", "c"], ["xs"]),
        node("Erf", ["xs"], ["e"]),
        node("Add", ["e", "one"], ["p"]),
    ]
    tail_nodes, inits = _tail(tail, half)
    inits |= {"c": f32(c), "one": f32(1.0)}
    return bind(onnx_graph(nodes + tail_nodes, {"x": X_SHAPE}, ["y"], inits), x=(2, 3, HIDDEN))


def gelu_tanh_graph(tail: str, half: float = 0.5):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x³))), as Hugging Face's NewGELU exports."""
    nodes = [
        node("Pow", ["x", "three"], ["x3"]),
        node("Mul", ["k", "x3"], ["kx3"]),
        node("Add", ["x", "kx3"], ["inner"]),
        node("Mul", ["s2pi", "inner"], ["z"]),
        node("Tanh", ["z"], ["t"]),
        node("Add", ["one", "t"], ["p"]),
    ]
    tail_nodes, inits = _tail(tail, half)
    inits |= {"three": f32(3.0), "k": f32(0.044715), "s2pi": f32(math.sqrt(2.0 / math.pi)), "one": f32(1.0)}
    return bind(onnx_graph(nodes + tail_nodes, {"x": X_SHAPE}, ["y"], inits), x=(2, 3, HIDDEN))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_gelu_erf_fuses(scale, tail):
    before = gelu_erf_graph(scale, tail)
    after = optimize(before, fold_constants, fuse_gelu, eliminate_dead_code)
    assert after.op_counts() == {"Gelu": 1}
    gelu = only(after, "Gelu")
    assert gelu.attrs == {"approximate": "none"} and gelu.inputs == ("x",) and gelu.outputs == ("y",)
    assert_same_outputs(before, after, wide_feeds(before))


@pytest.mark.parametrize("tail", TAILS)
def test_gelu_tanh_fuses(tail):
    before = gelu_tanh_graph(tail)
    after = optimize(before, fold_constants, fuse_gelu, eliminate_dead_code)
    assert after.op_counts() == {"Gelu": 1}
    gelu = only(after, "Gelu")
    assert gelu.attrs == {"approximate": "tanh"} and gelu.inputs == ("x",) and gelu.outputs == ("y",)
    assert_same_outputs(before, after, wide_feeds(before))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: gelu_erf_graph("div", "x_p_then_half", half=0.6), id="erf-half-is-0.6"),
        pytest.param(lambda: gelu_erf_graph("mul", "x_times_half_p", half=0.6), id="erf-dynamo-half-is-0.6"),
        pytest.param(lambda: gelu_erf_graph("div", "half_x_first", erf_const=0.6), id="erf-divisor-is-0.6"),
        pytest.param(lambda: gelu_erf_graph("mul", "x_p_then_half", erf_const=0.6), id="erf-factor-is-0.6"),
        pytest.param(lambda: gelu_tanh_graph("x_p_then_half", half=0.6), id="tanh-half-is-0.6"),
    ],
)
def test_gelu_with_a_wrong_constant_does_not_fuse(make):
    before = make()
    after = optimize(before, fold_constants, fuse_gelu, eliminate_dead_code)
    assert "Gelu" not in after.op_counts()
    assert after.op_counts() == before.op_counts()
    assert_same_outputs(before, after, wide_feeds(before))


def test_gelu_whose_intermediate_is_a_graph_output_does_not_fuse():
    before = gelu_erf_graph("div", "x_p_then_half")
    before.add_output("e")  # erf(x / sqrt 2) is wanted too
    after = optimize(before, fold_constants, fuse_gelu, eliminate_dead_code)
    assert "Gelu" not in after.op_counts()
    assert_same_outputs(before, after, wide_feeds(before))


# ----------------------------------------------------------------------------- Dense

N_OUT = 16
W, B = weights(HIDDEN, N_OUT), weights(N_OUT)


def _gelu_nodes(src: str, dst: str, approximate: str) -> tuple[list, dict]:
    """The exported (decomposed) GELU of `src` into `dst`: fuse_gelu turns it into Gelu first."""
    if approximate == "none":
        nodes = [
            node("Div", [src, "g_sqrt2"], ["g_xs"]),
            node("Erf", ["g_xs"], ["g_e"]),
            node("Add", ["g_e", "g_one"], ["g_p"]),
            node("Mul", [src, "g_p"], ["g_xp"]),
            node("Mul", ["g_xp", "g_half"], [dst]),
        ]
        return nodes, {"g_sqrt2": f32(SQRT2), "g_one": f32(1.0), "g_half": f32(0.5)}
    nodes = [
        node("Pow", [src, "g_three"], ["g_x3"]),
        node("Mul", ["g_k", "g_x3"], ["g_kx3"]),
        node("Add", [src, "g_kx3"], ["g_inner"]),
        node("Mul", ["g_s2pi", "g_inner"], ["g_z"]),
        node("Tanh", ["g_z"], ["g_t"]),
        node("Add", ["g_one", "g_t"], ["g_p"]),
        node("Mul", [src, "g_p"], ["g_xp"]),
        node("Mul", ["g_xp", "g_half"], [dst]),
    ]
    inits = {"g_three": f32(3.0), "g_k": f32(0.044715), "g_s2pi": f32(math.sqrt(2.0 / math.pi)), "g_one": f32(1.0), "g_half": f32(0.5)}
    return nodes, inits


def dense_graph(bias: str | None = "after", activation: str = "none", residual: str | None = None):
    """x @ W [+ b] [→ activation] [+ r]. `bias` is "after" (Add(mm, b)) or "before" (Add(b, mm));
    `residual` is "after" (Add(y, r)) or "before" (Add(r, y))."""
    nodes, inits, cur = [node("MatMul", ["x", "w"], ["mm"])], {"w": W}, "mm"
    if bias:
        nodes.append(node("Add", ["mm", "b"] if bias == "after" else ["b", "mm"], ["biased"]))
        inits["b"], cur = B, "biased"
    if activation in ("relu", "tanh"):
        nodes.append(node(activation.capitalize(), [cur], ["act"]))
        cur = "act"
    elif activation in ("gelu", "gelu_tanh"):
        more, more_inits = _gelu_nodes(cur, "act", "none" if activation == "gelu" else "tanh")
        nodes, cur = nodes + more, "act"
        inits |= more_inits
    inputs = {"x": X_SHAPE}
    if residual:
        nodes.append(node("Add", [cur, "r"] if residual == "after" else ["r", cur], ["res"]))
        inputs["r"], cur = ["batch", "seq", N_OUT], "res"
    nodes.append(node("Identity", [cur], ["y"]))  # a stable output name whatever the pattern's last node
    g = onnx_graph(nodes, inputs, ["y"], inits)
    return bind(g, x=(2, 3, HIDDEN), **({"r": (2, 3, N_OUT)} if residual else {}))


DENSE_PASSES = (fold_constants, fuse_gelu, fuse_dense, eliminate_dead_code)


@pytest.mark.parametrize(
    "bias, activation, residual",
    [
        (None, "none", None),
        ("after", "none", None),
        ("before", "none", None),
        ("after", "gelu", None),
        ("before", "gelu_tanh", None),
        ("after", "relu", None),
        ("after", "tanh", None),
        ("after", "none", "after"),
        ("before", "none", "before"),
        ("after", "gelu", "after"),
        (None, "none", "after"),
        (None, "relu", "before"),
    ],
)
def test_dense_fuses(bias, activation, residual):
    before = dense_graph(bias, activation, residual)
    after = optimize(before, *DENSE_PASSES)

    assert after.op_counts() == {"Dense": 1, "Identity": 1}
    dense = only(after, "Dense")
    assert dense.domain == ENGINE_DOMAIN
    assert dense.attrs == {"activation": activation}
    x, w, *rest = dense.inputs
    assert x == "x"
    np.testing.assert_array_equal(after.const(w), W)
    b = rest[0] if rest else ""
    r = rest[1] if len(rest) > 1 else ""
    if bias:
        np.testing.assert_array_equal(after.const(b), B)
    else:
        assert b == ""
    assert r == ("r" if residual else "")
    assert len(dense.inputs) == 2 + bool(bias or residual) + bool(residual)  # no trailing omitted inputs
    assert_same_outputs(before, after, wide_feeds(before, 1.0))


GEMM_W = weights(N_OUT, HIDDEN)  # [N, K] as transB=1 stores it


@pytest.mark.parametrize("trans_b", [1, 0])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_gemm_fuses(trans_b, activation):
    w = GEMM_W if trans_b else np.ascontiguousarray(GEMM_W.T)
    nodes = [node("Gemm", ["x", "w", "b"], ["gemm"], transB=trans_b)]
    nodes.append(node("Relu", ["gemm"], ["y"]) if activation == "relu" else node("Identity", ["gemm"], ["y"]))
    before = bind(onnx_graph(nodes, {"x": ["batch", HIDDEN]}, ["y"], {"w": w, "b": B}), x=(4, HIDDEN))
    after = optimize(before, *DENSE_PASSES)

    assert "Gemm" not in after.op_counts()
    dense = only(after, "Dense")
    assert dense.attrs == {"activation": activation}
    np.testing.assert_array_equal(after.const(dense.inputs[1]), GEMM_W.T)  # weights are [K, N]
    np.testing.assert_array_equal(after.const(dense.inputs[2]), B)
    assert_same_outputs(before, after)


def test_gemm_with_alpha_or_a_matrix_bias_does_not_fuse():
    nodes = [node("Gemm", ["x", "w", "b"], ["g1"], transB=1, alpha=2.0), node("Gemm", ["g1", "w2", "c"], ["y"])]
    inits = {"w": GEMM_W, "b": B, "w2": weights(N_OUT, N_OUT), "c": weights(4, N_OUT)}
    before = bind(onnx_graph(nodes, {"x": ["batch", HIDDEN]}, ["y"], inits), x=(4, HIDDEN))
    after = optimize(before, *DENSE_PASSES)
    assert after.op_counts() == {"Gemm": 2}
    assert_same_outputs(before, after)


def test_dense_does_not_absorb_the_bias_when_the_matmul_output_is_used_twice():
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "b"], ["y"]), node("Neg", ["mm"], ["z"])]
    before = bind(onnx_graph(nodes, {"x": X_SHAPE}, ["y", "z"], {"w": W, "b": B}), x=(2, 3, HIDDEN))
    after = optimize(before, *DENSE_PASSES)
    assert after.op_counts() == {"Add": 1, "Dense": 1, "Neg": 1}
    dense = only(after, "Dense")
    assert len(dense.inputs) == 2 and dense.attrs == {"activation": "none"}
    assert_same_outputs(before, after)


def test_dense_does_not_absorb_what_follows_a_bias_add_that_is_used_twice():
    """The bias Add's output also feeds Neg: the Dense may end at the bias (its output keeps the
    name Neg reads) but must not swallow the Relu, whose input would disappear."""
    nodes = [
        node("MatMul", ["x", "w"], ["mm"]),
        node("Add", ["mm", "b"], ["biased"]),
        node("Relu", ["biased"], ["y"]),
        node("Neg", ["biased"], ["z"]),
    ]
    before = bind(onnx_graph(nodes, {"x": X_SHAPE}, ["y", "z"], {"w": W, "b": B}), x=(2, 3, HIDDEN))
    after = optimize(before, *DENSE_PASSES)
    assert after.op_counts() == {"Dense": 1, "Neg": 1, "Relu": 1}
    dense = only(after, "Dense")
    assert dense.attrs == {"activation": "none"} and dense.outputs == ("biased",)
    assert only(after, "Relu").inputs == ("biased",)
    assert_same_outputs(before, after)


def test_dense_does_not_take_a_constant_or_broadcast_add_as_residual():
    """Add of a [3, N] constant is neither a bias (not a vector) nor a residual (constant)."""
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "c"], ["y"])]
    before = bind(onnx_graph(nodes, {"x": X_SHAPE}, ["y"], {"w": W, "c": weights(3, N_OUT)}), x=(2, 3, HIDDEN))
    after = optimize(before, *DENSE_PASSES)
    assert after.op_counts() == {"Add": 1, "Dense": 1}
    assert_same_outputs(before, after)


def test_dense_keeps_the_shape_a_higher_rank_bias_broadcasts_to():
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "b"], ["y"])]
    before = bind(onnx_graph(nodes, {"x": ["batch", HIDDEN]}, ["y"], {"w": W, "b": B.reshape(1, 1, N_OUT)}), x=(3, HIDDEN))
    after = optimize(before, *DENSE_PASSES)
    assert_same_outputs(before, after)


def test_matmul_with_a_runtime_weight_does_not_fuse():
    nodes = [node("MatMul", ["x", "w"], ["mm"]), node("Add", ["mm", "b"], ["y"])]
    before = bind(onnx_graph(nodes, {"x": X_SHAPE, "w": [HIDDEN, N_OUT]}, ["y"], {"b": B}), x=(2, 3, HIDDEN))
    after = optimize(before, *DENSE_PASSES)
    assert after.op_counts() == {"Add": 1, "MatMul": 1}
    assert_same_outputs(before, after)


# ----------------------------------------------------------------------------- attention

HEADS, HEAD_DIM = 2, 4
D_MODEL = HEADS * HEAD_DIM
ATT_W = {f"w{t}": weights(D_MODEL, D_MODEL) for t in "qkv"} | {f"b{t}": weights(D_MODEL) for t in "qkv"}
MASKS = {"full": ["batch", 1, "seq", "seq"], "key": ["batch", 1, 1, "seq"], "shared": [1, 1, "seq", "seq"]}


def attention_graph(
    form: str = "torchscript",
    scale: str = "qk_mul",
    mask: str | None = "full",
    k_perm: tuple[int, ...] = (0, 2, 3, 1),
    merge_transpose: bool = True,
    mask_before_scale: bool = False,
    mask_first: bool = False,
    batch: int = 2,
    seq: int = 5,
    bound: bool = True,
):
    """softmax(Q Kᵀ · scale + mask) V between Q/K/V projections and the head merge.

    torchscript: the head split [B, S, H, D] → Transpose(0, 2, 1, 3) with reshape targets computed
    at run time (Shape → Gather → Unsqueeze → Concat); Kᵀ is Transpose(0, 2, 3, 1) of the split.
    dynamo: Kᵀ is Reshape [B*H, S, D] → Transpose(0, 2, 1) → Reshape [B, H, D, S] of the split heads.
    scale: "qk_mul" multiplies Q and K each by d**-0.25; "div" divides the scores by sqrt(d)."""
    nodes = []
    for t in "qkv":
        nodes += [node("MatMul", ["x", f"w{t}"], [f"{t}_mm"]), node("Add", [f"{t}_mm", f"b{t}"], [f"{t}_lin"])]
    nodes += [
        node("Shape", ["x"], ["shape"]),
        node("Gather", ["shape", "zero"], ["b0"], axis=0),
        node("Gather", ["shape", "one"], ["s0"], axis=0),
        node("Unsqueeze", ["b0", "axes0"], ["b1"]),
        node("Unsqueeze", ["s0", "axes0"], ["s1"]),
        node("Concat", ["b1", "s1", "heads", "head_dim"], ["split_shape"], axis=0),
        node("Concat", ["b1", "s1", "d_model"], ["merge_shape"], axis=0),
    ]
    inits = dict(ATT_W) | {
        "zero": i64(0),
        "one": i64(1),
        "axes0": i64([0]),
        "heads": i64([HEADS]),
        "head_dim": i64([HEAD_DIM]),
        "d_model": i64([D_MODEL]),
        "qk_scale": f32(HEAD_DIM**-0.25),
        "sqrt_d": f32(math.sqrt(HEAD_DIM)),
    }
    for t in "qkv":
        nodes.append(node("Reshape", [f"{t}_lin", "split_shape"], [f"{t}_4d"]))
    nodes += [node("Transpose", ["q_4d"], ["q_h"], perm=[0, 2, 1, 3]), node("Transpose", ["v_4d"], ["v_h"], perm=[0, 2, 1, 3])]
    if form == "torchscript":
        nodes.append(node("Transpose", ["k_4d"], ["k_t"], perm=list(k_perm)))
    else:
        nodes += [
            node("Transpose", ["k_4d"], ["k_h"], perm=[0, 2, 1, 3]),
            node("Reshape", ["k_h", "k3_shape"], ["k_3d"]),
            node("Transpose", ["k_3d"], ["k_3t"], perm=[0, 2, 1]),
            node("Reshape", ["k_3t", "k4_shape"], ["k_t"]),
        ]
        inits |= {"k3_shape": i64([-1, seq, HEAD_DIM]), "k4_shape": i64([batch, HEADS, HEAD_DIM, seq])}
    if scale == "qk_mul" and form == "torchscript":  # d**-0.25 computed at run time, as the exporter writes it
        nodes += [
            node("Shape", ["q_h"], ["q_shape"]),
            node("Slice", ["q_shape", "minus_one", "int64_max"], ["d_int"]),
            node("Cast", ["d_int"], ["d_float"], to=TensorProto.FLOAT),
            node("Sqrt", ["d_float"], ["sqrt_d_rt"]),
            node("Div", ["one_f", "sqrt_d_rt"], ["inv_sqrt_d"]),
            node("Sqrt", ["inv_sqrt_d"], ["qk_scale"]),
        ]
        inits |= {"minus_one": i64([-1]), "int64_max": i64([2**63 - 1]), "one_f": f32([1.0])}
        del inits["qk_scale"]
    if scale == "qk_mul":
        nodes += [
            node("Mul", ["q_h", "qk_scale"], ["q_s"]),
            node("Mul", ["k_t", "qk_scale"], ["k_s"]),
            node("MatMul", ["q_s", "k_s"], ["scores"]),
        ]
    else:
        nodes.append(node("MatMul", ["q_h", "k_t"], ["qk"]))
        if mask and mask_before_scale:
            nodes += [node("Add", ["qk", "mask"], ["qk_m"]), node("Div", ["qk_m", "sqrt_d"], ["masked"])]
        else:
            nodes.append(node("Div", ["qk", "sqrt_d"], ["scores"]))
    if mask and not mask_before_scale:
        nodes.append(node("Add", ["mask", "scores"] if mask_first else ["scores", "mask"], ["masked"]))
    probs_in = "masked" if mask else "scores"
    nodes += [node("Softmax", [probs_in], ["probs"], axis=-1), node("MatMul", ["probs", "v_h"], ["ctx"])]
    if merge_transpose:
        nodes += [node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]), node("Reshape", ["ctx_t", "merge_shape"], ["y"])]
    else:  # the same reshape without putting the heads back next to each other: a different function
        nodes.append(node("Reshape", ["ctx", "merge_shape"], ["y"]))
    inputs = {"x": ["batch", "seq", D_MODEL]}
    if mask:
        inputs["mask"] = MASKS[mask]
    g = onnx_graph(nodes, inputs, ["y"], inits)
    if not bound:
        return g
    shapes = {"x": (batch, seq, D_MODEL)}
    if mask:
        shapes["mask"] = {"full": (batch, 1, seq, seq), "key": (batch, 1, 1, seq), "shared": (1, 1, seq, seq)}[mask]
    return bind(g, **shapes)


ATTENTION_PASSES = (fold_constants, fuse_gelu, fuse_dense, fuse_attention, eliminate_dead_code)


def attention_feeds(graph) -> dict[str, np.ndarray]:
    """A real-valued additive mask (not just 0 / -inf), so any mishandling of it shows."""
    return random_feeds(graph, seed=3)


@pytest.mark.parametrize("mask", ["full", "key", "shared", None])
@pytest.mark.parametrize("scale", ["qk_mul", "div"])
@pytest.mark.parametrize("form", ["torchscript", "dynamo"])
def test_attention_fuses(form, scale, mask):
    before = attention_graph(form, scale, mask)
    after = optimize(before, *ATTENTION_PASSES)

    assert after.op_counts() == {"Attention": 1, "Dense": 3}
    att = only(after, "Attention")
    assert att.domain == ENGINE_DOMAIN
    assert att.attrs["num_heads"] == HEADS
    assert att.attrs["scale"] == pytest.approx(HEAD_DIM**-0.5, rel=1e-6)
    dense_out = {n.inputs[1]: n.outputs[0] for n in after.nodes if n.op == "Dense"}
    by_weight = {t: next(o for w, o in dense_out.items() if np.array_equal(after.const(w), ATT_W[f"w{t}"])) for t in "qkv"}
    assert att.inputs[:3] == (by_weight["q"], by_weight["k"], by_weight["v"])
    assert att.inputs[3:] == (("mask",) if mask else ())
    assert att.outputs == ("y",)
    assert_same_outputs(before, after, attention_feeds(before))


@pytest.mark.parametrize("form", ["torchscript", "dynamo"])
def test_attention_fuses_with_the_mask_as_first_operand(form):
    before = attention_graph(form, mask_first=True)
    after = optimize(before, *ATTENTION_PASSES)
    assert after.op_counts() == {"Attention": 1, "Dense": 3}
    assert only(after, "Attention").inputs[3] == "mask"
    assert_same_outputs(before, after, attention_feeds(before))


def test_attention_waits_for_bound_shapes():
    """With batch and sequence still symbolic the head split cannot be checked: no fusion, and
    binding the dims afterwards gives the original outputs."""
    unbound = attention_graph(bound=False)
    after = optimize(unbound, *ATTENTION_PASSES)
    assert "Attention" not in after.op_counts() and after.op_counts()["Softmax"] == 1
    assert_same_outputs(attention_graph(), bind(after, x=(2, 5, D_MODEL), mask=(2, 1, 5, 5)), attention_feeds(attention_graph()))


@pytest.mark.parametrize(
    "kwargs",
    [
        # K split with (0, 2, 1, 3): scores are Q·K, not Q·Kᵀ (shapes only agree because S == D)
        pytest.param({"k_perm": (0, 2, 1, 3), "seq": HEAD_DIM}, id="k-not-transposed"),
        pytest.param({"k_perm": (0, 2, 1, 3), "seq": HEAD_DIM, "scale": "div"}, id="k-not-transposed-div"),
        # heads reshaped back without the Transpose(0, 2, 1, 3)
        pytest.param({"merge_transpose": False}, id="merge-without-transpose"),
    ],
)
def test_attention_with_a_different_permutation_does_not_fuse(kwargs):
    before = attention_graph(**kwargs)
    after = optimize(before, *ATTENTION_PASSES)
    counts = after.op_counts()
    assert "Attention" not in counts and counts["Softmax"] == 1 and counts["Dense"] == 3
    assert_same_outputs(before, after, attention_feeds(before))


def test_attention_whose_probabilities_are_a_graph_output_does_not_fuse():
    before = attention_graph()
    before.add_output("probs")
    after = optimize(before, *ATTENTION_PASSES)
    assert "Attention" not in after.op_counts()
    assert_same_outputs(before, after, attention_feeds(before))


def test_attention_with_the_mask_added_before_the_scale_keeps_its_outputs():
    before = attention_graph(scale="div", mask="full", mask_before_scale=True)
    after = optimize(before, *ATTENTION_PASSES)
    assert_same_outputs(before, after, attention_feeds(before))
