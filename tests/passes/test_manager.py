"""The pass manager: Sequential ordering, the context's switches (disabled > required > opt_level),
`requires`, validation after each pass, and the instruments (PassTimings, IRDump)."""

from __future__ import annotations

import types

import pytest

from sparseinfer.graph import GraphError, Node
from sparseinfer.passes import (
    FunctionPass,
    IRDump,
    Pass,
    PassContext,
    PassError,
    PassInstrument,
    PassTimings,
    Sequential,
    default_pipeline,
    eliminate_dead_code,
    eliminate_noops,
    fold_constants,
    function_pass,
    fuse_dense,
    manager,
)
from tests.passes.builders import assert_same_outputs, node, onnx_graph, optimize


def small_graph():
    """x → Identity → Relu → y, plus a dead Neg: something for the real cleanups to do."""
    nodes = [node("Identity", ["x"], ["a"]), node("Relu", ["a"], ["y"]), node("Neg", ["a"], ["dead"])]
    return onnx_graph(nodes, {"x": [2, 3]}, ["y"])


def recorder(log: list, name: str, opt_level: int = 1, changes: int = 0, requires=()) -> FunctionPass:
    """A pass that only notes that it ran (and claims `changes` edits)."""

    @function_pass(name, opt_level=opt_level, requires=requires)
    def run(graph, ctx):
        log.append(name)
        return changes

    return run


# ----------------------------------------------------------------------------- ordering and switches


def test_sequential_runs_in_declared_order():
    log: list[str] = []
    names = ["c", "a", "b", "a2"]
    ctx = PassContext()
    Sequential([recorder(log, n) for n in names])(small_graph(), ctx)
    assert log == names  # declared order, not sorted or grouped
    assert ctx.ran == [*names, "sequential"]


def test_sequential_nested_and_repeated():
    log: list[str] = []
    a, b = recorder(log, "a"), recorder(log, "b")
    inner = Sequential([b, a], name="inner")
    ctx = PassContext()
    Sequential([a, inner, b], name="outer")(small_graph(), ctx)
    assert log == ["a", "b", "a", "b"]
    assert ctx.ran == ["a", "b", "a", "inner", "b", "outer"]


@pytest.mark.parametrize(
    "opt_level, disabled, required, runs",
    [
        (2, set(), set(), True),  # opt_level 2 ≤ 2
        (1, set(), set(), False),  # opt_level 2 > 1
        (1, set(), {"p"}, True),  # required beats opt_level
        (0, set(), {"p"}, True),
        (3, {"p"}, set(), False),  # disabled beats opt_level
        (3, {"p"}, {"p"}, False),  # disabled beats required
        (1, {"other"}, {"other"}, False),  # switches for other passes do not matter
    ],
)
def test_disabled_beats_required_beats_opt_level(opt_level, disabled, required, runs):
    log: list[str] = []
    p = recorder(log, "p", opt_level=2)
    ctx = PassContext(opt_level=opt_level, disabled=set(disabled), required=set(required))
    assert ctx.enabled(p) is runs
    Sequential([recorder(log, "before", opt_level=0), p, recorder(log, "after", opt_level=0)])(small_graph(), ctx)
    assert log == (["before", "p", "after"] if runs else ["before", "after"])
    assert ("p" in ctx.ran) is runs


def test_opt_level_zero_runs_only_level_zero_passes():
    ctx = PassContext(opt_level=0)
    before = small_graph()
    after = optimize(before, *default_pipeline(), ctx=ctx)
    assert ctx.ran[:-1] == [p.name for p in default_pipeline() if p.opt_level == 0]
    assert "eliminate_dead_code" in ctx.ran and "eliminate_noops" not in ctx.ran
    assert "Neg" not in after.op_counts() and "Identity" in after.op_counts()
    assert_same_outputs(before, after)


def test_pass_reads_its_settings_from_the_context():
    seen = []

    @function_pass("configurable")
    def configurable(graph, ctx):
        seen.append(ctx.config.get("threshold"))
        return 0

    configurable(small_graph(), PassContext(config={"threshold": 0.25}))
    configurable(small_graph())  # a fresh context when none is given
    assert seen == [0.25, None]


def test_function_pass_keeps_name_level_doc_and_counts_none_as_zero():
    @function_pass("documented", opt_level=3, requires=("x",))
    def documented(graph, ctx):
        """Does nothing, documented."""

    assert isinstance(documented, Pass)
    assert (documented.name, documented.opt_level, documented.requires) == ("documented", 3, ("x",))
    assert documented.__doc__ == "Does nothing, documented."
    assert documented.run(small_graph(), PassContext()) == 0
    assert "documented" in repr(documented)


def test_calling_a_pass_returns_the_edited_graph():
    g = small_graph()
    assert eliminate_dead_code(g) is g
    assert "Neg" not in g.op_counts()


# ----------------------------------------------------------------------------- requires


def test_missing_requirement_raises_naming_it():
    log: list[str] = []
    needy = recorder(log, "needy", requires=("prepare",))
    ctx = PassContext()
    g = small_graph()
    with pytest.raises(PassError, match=r"needy.*requires.*'prepare'"):
        Sequential([recorder(log, "unrelated"), needy])(g, ctx)
    assert log == ["unrelated"]  # the needy pass did not run
    assert "needy" not in ctx.ran


def test_requirement_disabled_in_the_context_raises():
    log: list[str] = []
    pipeline = Sequential([recorder(log, "prepare"), recorder(log, "needy", requires=("prepare",))])
    with pytest.raises(PassError, match="prepare"):
        pipeline(small_graph(), PassContext(disabled={"prepare"}))


def test_requirement_that_ran_earlier_is_satisfied():
    log: list[str] = []
    pipeline = Sequential([recorder(log, "prepare"), recorder(log, "needy", requires=("prepare",))])
    pipeline(small_graph(), PassContext())
    assert log == ["prepare", "needy"]


def test_real_fusion_requires_its_predecessor():
    """fuse_dense alone: fuse_gelu must have run (Dense absorbs the Gelu it makes)."""
    g = small_graph()
    before = str(g)
    with pytest.raises(PassError, match="fuse_gelu"):
        fuse_dense(g)
    assert str(g) == before


# ----------------------------------------------------------------------------- validate


@function_pass("breaks_graph")
def breaks_graph(graph, ctx):
    """Removes the node that writes a value others still read: the graph no longer validates."""
    graph.remove_node(graph.producer("a"))
    return 1


def test_validate_catches_a_pass_that_leaves_the_graph_invalid():
    log: list[str] = []
    timings = PassTimings()
    ctx = PassContext(validate=True, instruments=[timings])
    with pytest.raises(PassError, match="breaks_graph.*invalid") as info:
        Sequential([breaks_graph, recorder(log, "later")])(small_graph(), ctx)
    assert isinstance(info.value.__cause__, GraphError)
    assert log == []  # nothing ran after it
    assert [r[0] for r in timings.records] == []  # and no instrument saw it succeed


def test_without_validate_the_broken_graph_goes_through():
    g = small_graph()
    Sequential([breaks_graph])(g, PassContext(validate=False))
    with pytest.raises(GraphError):
        g.validate()


def test_validate_accepts_the_real_pipeline():
    before = small_graph()
    after = optimize(before, *default_pipeline(), ctx=PassContext(validate=True))
    assert after.op_counts() == {"Relu": 1}
    assert_same_outputs(before, after)


def test_validate_catches_a_value_written_twice():
    @function_pass("duplicates")
    def duplicates(graph, ctx):
        relu = graph.producer("y")
        graph.replace_node(relu, [relu, Node("Abs", ("a",), ("y",), version=13)])
        return 1

    with pytest.raises(PassError, match="duplicates.*written more than once"):
        duplicates(small_graph(), PassContext(validate=True))


# ----------------------------------------------------------------------------- instruments


def test_pass_timings_records_one_row_per_pass_run():
    log: list[str] = []
    timings = PassTimings()
    pipeline = Sequential(
        [
            recorder(log, "a", changes=3),
            recorder(log, "skipped", opt_level=9, changes=5),
            recorder(log, "b", changes=0),
            recorder(log, "a", changes=3),
        ],
        name="pipe",
    )
    pipeline(small_graph(), PassContext(instruments=[timings]))
    assert [(name, changes) for name, _, changes in timings.records] == [("a", 3), ("b", 0), ("a", 3), ("pipe", 6)]
    assert all(isinstance(t, float) and t >= 0 for _, t, _ in timings.records)
    table = timings.table().splitlines()
    assert table[0].split() == ["pass", "ms", "changes"]
    assert [row.split()[0] for row in table[1:]] == ["a", "b", "a", "pipe"]
    assert [row.split()[-1] for row in table[1:]] == ["3", "0", "3", "6"]


def test_pass_timings_counts_real_changes():
    timings = PassTimings()
    optimize(small_graph(), eliminate_noops, eliminate_dead_code, ctx=PassContext(instruments=[timings]))
    assert [(n, c) for n, _, c in timings.records] == [("eliminate_noops", 1), ("eliminate_dead_code", 1), ("sequential", 2)]


def fake_clock(monkeypatch, log: list):
    """Replace the manager's clock with one that only moves when a pass says so."""
    now = [0.0]
    monkeypatch.setattr(manager, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def ticking(name: str, seconds: float) -> FunctionPass:
        @function_pass(name)
        def run(graph, ctx):
            now[0] += seconds
            log.append(name)
            return 0

        return run

    return ticking


def test_pass_timings_measures_each_pass(monkeypatch):
    log: list[str] = []
    ticking = fake_clock(monkeypatch, log)
    timings = PassTimings()
    ctx = PassContext(instruments=[timings])
    Sequential([ticking("a", 1.0), ticking("b", 2.0)]).run(small_graph(), ctx)
    assert [(n, t) for n, t, _ in timings.records] == [("a", 1.0), ("b", 2.0)]


def test_pass_timings_times_a_sequential_as_a_whole(monkeypatch):
    log: list[str] = []
    ticking = fake_clock(monkeypatch, log)
    timings = PassTimings()
    Sequential([ticking("a", 1.0), ticking("b", 2.0)], name="pipe")(small_graph(), PassContext(instruments=[timings]))
    assert [(n, t) for n, t, _ in timings.records] == [("a", 1.0), ("b", 2.0), ("pipe", 3.0)]


def test_ir_dump_captures_the_ir_before_and_after():
    g = small_graph()
    text_before = str(g)
    dump = IRDump()
    ctx = PassContext(instruments=[dump])
    Sequential([eliminate_noops, eliminate_dead_code], name="clean")(g, ctx)
    assert [name for name, _ in dump.dumps] == ["input", "eliminate_noops", "eliminate_dead_code", "clean"]
    assert dump.dumps[0][1] == text_before
    assert "Identity" in dump.dumps[0][1] and "Identity" not in dump.dumps[1][1]
    assert "Neg" in dump.dumps[1][1] and "Neg" not in dump.dumps[2][1]
    assert dump.dumps[-1][1] == str(g)


def test_ir_dump_only_some_passes():
    dump = IRDump(only={"eliminate_dead_code"})
    g = small_graph()
    Sequential([eliminate_noops, eliminate_dead_code, fold_constants], name="clean")(g, PassContext(instruments=[dump]))
    assert [name for name, _ in dump.dumps] == ["input", "eliminate_dead_code"]
    assert "Identity" not in dump.dumps[1][1] and "Neg" not in dump.dumps[1][1]


def test_instruments_are_called_in_order_around_each_pass():
    events = []

    class Spy(PassInstrument):
        def __init__(self, tag):
            self.tag = tag

        def run_before_pass(self, graph, pass_):
            events.append((self.tag, "before", pass_.name))

        def run_after_pass(self, graph, pass_, changed):
            events.append((self.tag, "after", pass_.name, changed))

    ctx = PassContext(instruments=[Spy(1), Spy(2)])
    eliminate_dead_code(small_graph(), ctx)
    assert events == [
        (1, "before", "eliminate_dead_code"),
        (2, "before", "eliminate_dead_code"),
        (1, "after", "eliminate_dead_code", 1),
        (2, "after", "eliminate_dead_code", 1),
    ]


def test_ctx_ran_lists_what_ran():
    log: list[str] = []
    pipeline = Sequential(
        [recorder(log, "fold"), recorder(log, "off"), recorder(log, "fast", opt_level=1), recorder(log, "slow", opt_level=2)], name="pipe"
    )
    ctx = PassContext(opt_level=1, disabled={"off"})
    pipeline(small_graph(), ctx)
    assert ctx.ran == ["fold", "fast", "pipe"] and log == ctx.ran[:-1]


def test_default_pipeline_order():
    """The ordering constraints written beside the pipeline hold, and every `requires` is met by
    a pass listed earlier."""
    names = [p.name for p in default_pipeline()]
    # the quantized-matmul import comes first: folding would turn DequantizeLinear(weight) into an fp32 weight
    assert names[:2] == ["import_quantized", "fold_constants"] and names[-1] == "eliminate_dead_code"
    pos = {
        n: names.index(n) for n in ("fuse_layernorm", "fuse_gelu", "fuse_dense", "fuse_quantized_epilogue", "fuse_attention", "merge_qkv")
    }
    assert pos["fuse_layernorm"] < pos["fuse_dense"] and pos["fuse_gelu"] < pos["fuse_dense"] < pos["fuse_attention"]
    assert pos["fuse_gelu"] < pos["fuse_quantized_epilogue"] < pos["fuse_attention"] < pos["merge_qkv"]
    seen: set[str] = set()
    for p in default_pipeline():
        assert set(p.requires) <= seen, p
        seen.add(p.name)
