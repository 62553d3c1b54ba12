"""Time the engine's Attention step against the bare attention kernel on the same data.

    python benchmarks/attention_in_engine.py [--batch 1 8] [--rounds 15] [--inner 10]

Builds the BERT-base engine (the model of ``bench_bert.py``, saved under
``benchmarks/results``), runs its plan step by step up to the first Attention step, and then
times, on exactly those buffers (the fused QKV output ``[B*S, 3*768]``, the engine's mask and
workspaces), interleaved round by round and reported as medians (and 10th percentiles, less sensitive to
other processes) per call:

- ``step``        the plan step as the engine runs it (mask construction + kernel call)
- ``kernel``      ``attention_packed`` alone with the step's arguments (mask prebuilt)
- ``mask only``   the step's per-run mask construction alone
- ``separate``    the kernel with q, k, v copied into three contiguous ``[B*S, 768]`` arrays
- ``no mask``     the kernel with ``mask=None`` (a different compiled specialisation)
- ``fresh ws``    the kernel with workspaces from ``make_workspace`` instead of the arena's
- ``dense+attn``  the preceding Dense step then the Attention step, minus ``dense`` alone
                  (the cost of the Attention step right after another parallel region)

``step / kernel`` near 1 means the engine adds nothing around the kernel.  Also prints the
step's share of a full ``Plan.run`` as ``Engine.profile`` reports it, and the machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import sparseinfer  # noqa: E402, F401, I001  (before numba: it sets numba's compile target)
import numba  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_bert import make_feeds  # noqa: E402
from bert_base import build_bert  # noqa: E402

from sparseinfer import Engine  # noqa: E402
from sparseinfer.kernels import attention as k_attention  # noqa: E402
from sparseinfer.runtime.plan import _rows  # noqa: E402


def load() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average ?"


def state_before_attention(engine: Engine, feeds: dict):
    """Run the plan's steps up to the first Attention step; return (plan, env, arena, index)."""
    plan = engine.plan(feeds)
    arena = plan._new_arena()
    env = dict(plan._consts)
    env.update(feeds)
    for i, st in enumerate(plan.steps):
        if st.node.op == "Attention" and st.kind == "kernel":
            return plan, env, arena, i
        st.fn(env, arena)
    raise SystemExit("the plan has no Attention kernel step")


def step_workspaces(plan, node, arena):
    """The (kt, vp, pw) arrays the Attention step of `node` uses in `arena` (a set per node,
    or one set shared by every Attention step of the same shape)."""
    names = [n for n in plan.workspaces if n.startswith(f"{node.outputs[0]}__ws")]
    if not names:
        names = [n for n in plan.workspaces if n.startswith("Attention__ws")]
    names.sort(key=lambda n: n.split("__ws")[1])
    return tuple(arena[n] for n in names[:3])


def interleaved(fns: dict, rounds: int, inner: int) -> dict:
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fns[k]()  # untimed: warm this variant's caches
            for _ in range(inner):
                t = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    p10 = {k: 1e3 * sorted(v)[len(v) // 10] for k, v in times.items()}
    return med, p10


def bench(engine: Engine, batch: int, seq: int, rounds: int, inner: int) -> None:
    feeds = make_feeds(batch, seq, 30522)
    engine.run(feeds)
    plan, env, arena, ia = state_before_attention(engine, feeds)
    st = plan.steps[ia]
    prev = plan.steps[ia - 1]
    node = st.node
    q, k, v = node.inputs[:3]
    mask_name = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
    h = node.attrs["num_heads"]
    b, s = plan.graph.info(q).shape[:2]
    hd = node.attrs.get("hidden", 0) or plan.graph.info(q).shape[2]
    d = hd // h
    cols = [int(node.attrs.get(f"{t}_offset", 0)) for t in "qkv"]
    scale = np.float32(node.attrs["scale"])
    kt, vp, pw = step_workspaces(plan, node, arena)
    nth = max(1, min(numba.get_num_threads(), kt.shape[0], b * h))
    qa, ka, va = _rows(env[q]), _rows(env[k]), _rows(env[v])
    raw_mask = env[mask_name] if mask_name else None
    mask = None if raw_mask is None else np.ascontiguousarray(np.broadcast_to(raw_mask.reshape(-1, s), (b, s)), np.float32)
    out = _rows(arena[node.outputs[0]])
    print(
        f"\n== B={batch} S={seq}: Attention node {node.name or node.outputs[0]!r}, inputs q/k/v shapes "
        f"{qa.shape}/{ka.shape}/{va.shape} same buffer: {qa is ka is va or (qa.base is not None and qa.base is ka.base)}, "
        f"cols {cols}, H={h} D={d}, mask {None if raw_mask is None else (raw_mask.shape, raw_mask.dtype)}, "
        f"workspace threads {kt.shape[0]} ({plan.workspace_bytes / 2**10:.0f} KiB of workspace per arena), numba.get_num_threads() {numba.get_num_threads()}, nth {nth}; "
        f"previous step {prev.node.op} ({prev.kind})"
    )
    qs = np.ascontiguousarray(qa[:, cols[0] : cols[0] + hd])
    ks = np.ascontiguousarray(ka[:, cols[1] : cols[1] + hd])
    vs = np.ascontiguousarray(va[:, cols[2] : cols[2] + hd])
    fresh = k_attention.make_workspace(s, d)
    out2 = np.empty_like(out)

    def kernel(qq=qa, kk=ka, vv=va, c=cols, m=mask, ws=(kt, vp, pw), o=out):
        k_attention.attention_packed(qq, kk, vv, *c, m, b, s, h, d, scale, o, *ws, nth)

    variants = {
        "step": lambda: st.fn(env, arena),
        "kernel": kernel,
        "mask only": (lambda: np.ascontiguousarray(np.broadcast_to(raw_mask.reshape(-1, s), (b, s)), np.float32))
        if raw_mask is not None
        else (lambda: None),
        "separate": lambda: kernel(qs, ks, vs, (0, 0, 0), o=out2),
        "no mask": lambda: kernel(m=None, o=out2),
        "fresh ws": lambda: kernel(ws=fresh, o=out2),
        "dense": lambda: prev.fn(env, arena),
        "dense+attn": lambda: (prev.fn(env, arena), st.fn(env, arena)),
    }
    # reference check: all variants with a mask agree bit for bit with the step
    st.fn(env, arena)
    ref = out.copy()
    for name in ("separate", "fresh ws"):
        out2[:] = np.nan
        variants[name]()
        assert np.array_equal(out2, ref), name
    print("   variants agree bit for bit with the step;", load())
    t, t10 = interleaved(variants, rounds, inner)
    print(f"   {'':10s} {'median':>7s}    {'p10':>7s}")
    for name in ("step", "kernel", "mask only", "separate", "no mask", "fresh ws", "dense"):
        print(f"   {name:10s} {t[name]:7.3f} ms {t10[name]:7.3f} ms")
    print(
        f"   {'dense+attn':10s} {t['dense+attn']:7.3f} ms {t10['dense+attn']:7.3f} ms  -> attention after a Dense: "
        f"{t['dense+attn'] - t['dense']:.3f} ms (p10 {t10['dense+attn'] - t10['dense']:.3f} ms)"
    )
    print(
        f"   step/kernel {t['step'] / t['kernel']:.3f}   separate/kernel {t['separate'] / t['kernel']:.3f}   (x12 layers: step {12 * t['step']:.1f} ms)"
    )
    # paired: the step timed right after the Dense step (as in a run) and right after itself
    after_dense, after_self = [], []
    for _ in range(rounds * inner):
        prev.fn(env, arena)
        t0 = time.perf_counter()
        st.fn(env, arena)
        t1 = time.perf_counter()
        st.fn(env, arena)
        t2 = time.perf_counter()
        after_dense.append(t1 - t0)
        after_self.append(t2 - t1)
    ad, aself = sorted(after_dense), sorted(after_self)
    n10 = len(ad) // 10
    print(
        f"   step after Dense {1e3 * statistics.median(ad):.3f} ms (p10 {1e3 * ad[n10]:.3f}), "
        f"after itself {1e3 * statistics.median(aself):.3f} ms (p10 {1e3 * aself[n10]:.3f})"
    )
    # single thread (insensitive to a preempted partner thread): fused buffer vs separate arrays
    saved = numba.get_num_threads()
    numba.set_num_threads(1)
    one = {
        "fused 1T": lambda: k_attention.attention_packed(qa, ka, va, *cols, mask, b, s, h, d, scale, out2, kt, vp, pw, 1),
        "separate 1T": lambda: k_attention.attention_packed(qs, ks, vs, 0, 0, 0, mask, b, s, h, d, scale, out2, kt, vp, pw, 1),
    }
    t1, t110 = interleaved(one, rounds, max(1, inner // 2))
    numba.set_num_threads(saved)
    print("   " + "   ".join(f"{k} {t1[k]:.3f} ms (p10 {t110[k]:.3f})" for k in one))
    # what Engine.profile reports for the same shape
    per = []
    for _ in range(max(3, rounds // 3)):
        time.sleep(0.1)
        rows = engine.profile(feeds)
        per.append(sum(r["ms"] for r in rows if r["op"] == "Attention"))
    print(f"   Engine.profile: Attention total {statistics.median(per):.2f} ms per run (median of {len(per)}), {load()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    a = ap.parse_args()
    path = HERE / "results" / f"bert-{a.layers}x768.onnx"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        onnx.save(build_bert(num_layers=a.layers, hidden=768, heads=12, ffn=3072), str(path))
    engine = Engine(path, num_threads=2)
    for bsz in a.batch:
        engine.run(make_feeds(bsz, a.seq, 30522))
    print(
        f"numba {numba.__version__}, threading layer {numba.threading_layer()}, {numba.get_num_threads()} threads; "
        f"attention_packed specialisations compiled by the engine runs: {len(k_attention.attention_packed.signatures)}; {load()}"
    )
    for bsz in a.batch:
        bench(engine, bsz, a.seq, a.rounds, a.inner)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
