"""Worst difference from onnxruntime, per fixture model, over the shapes the tests use.

python scripts/parity_report.py            # the compiled Engine (passes + kernels)
python scripts/parity_report.py --reference  # the NumPy reference executor on the imported graph
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sparseinfer import Engine  # noqa: E402
from sparseinfer.graph import import_onnx, run_graph  # noqa: E402
from tests.conftest import FIXTURES, MANIFEST, make_inputs  # noqa: E402
from tests.graph.test_fixture_parity import SHAPES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", action="store_true", help="run the imported graph on the reference executor")
    args = ap.parse_args()
    print(
        f"{'model':56s} {'max abs diff':>12s} {'max rel diff':>12s}   ({'reference executor' if args.reference else 'Engine'}; shapes {SHAPES})"
    )
    for entry in MANIFEST:
        path = FIXTURES / entry["path"]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph = import_onnx(path) if args.reference else None
        engine = None if args.reference else Engine(path)
        worst_abs = worst_rel = 0.0
        for batch, seq in SHAPES:
            feeds = make_inputs(entry, batch, seq, seed=batch * 1000 + seq)
            ours = run_graph(graph, feeds) if args.reference else engine.run(feeds)
            for a, b in zip(ours, session.run(None, feeds)):
                diff = np.abs(a.astype(np.float64) - b)
                worst_abs = max(worst_abs, float(diff.max()))
                worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(b), 1e-6)).max()))
        print(f"{entry['path']:56s} {worst_abs:12.2e} {worst_rel:12.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
