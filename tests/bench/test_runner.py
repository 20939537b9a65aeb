"""A tiny end-to-end bench on stories260k: records, resume, summary, plots and the HTML report."""

import json

import pytest

from infercache.bench.records import RecordFile
from infercache.bench.report import summarize, write_report
from infercache.bench.runner import BenchConfig, run_bench, run_meta
from infercache.models.weights import stories260k_available


@pytest.mark.skipif(not stories260k_available(), reason="the optional shared/models/stories260K folder is absent")
def test_tiny_bench_end_to_end_and_resume(tmp_path):
    config = BenchConfig(model="stories260k", methods=["snapkv", "streaming_llm"], budgets=[0.25, 0.5],
                         tasks=["niah_single"], lengths=[200], samples=2, protocols=["question_aware", "question_agnostic"],
                         fidelity=True, fidelity_tokens=16)
    records = run_bench(config, tmp_path, progress=False)
    tasks = [r for r in records if r["kind"] == "task"]
    # 2 samples x (full once + 2 methods x 2 budgets x 2 protocols)
    assert len(tasks) == 2 * (1 + 2 * 2 * 2)
    assert all(0.0 <= r["score"] <= 1.0 for r in tasks)
    compressed = [r for r in tasks if r["method"] != "full"]
    full = {r["sample_id"]: r["cache_bytes"] for r in tasks if r["method"] == "full"}
    for r in compressed:
        assert r["cache_bytes"] < full[r["sample_id"]]
    fidelity = [r for r in records if r["kind"] == "fidelity"]
    assert len(fidelity) == 4 and all(r["kl"] >= 0 and 0 <= r["top1"] <= 1 for r in fidelity)

    lines_before = (tmp_path / "samples.jsonl").read_text().count("\n")
    again = run_bench(config, tmp_path, progress=False)  # everything done: nothing measured again
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == lines_before
    assert len(again) == len(records)

    summary = write_report(again, {"model": "stories260k", **run_meta(config)}, tmp_path)
    assert {r["method"] for r in summary["rows"]} == {"full", "snapkv", "streaming_llm"}
    for name in ("summary.json", "results.md", "score_vs_budget.png", "needle_heatmap.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "snapkv" in page


def test_interrupted_line_is_measured_again(tmp_path):
    path = tmp_path / "samples.jsonl"
    good = {"kind": "task", "engine": "infercache", "model": "m", "method": "snapkv", "budget": 0.5,
            "protocol": "question_aware", "task": "niah_single", "length": 10, "sample_id": "a", "score": 1.0}
    path.write_text(json.dumps(good) + "\n" + '{"kind": "task", "engi')
    records = RecordFile(path)
    assert len(records.records) == 1 and len(records.done) == 1


def test_summary_averages_scores_and_relates_bytes_to_full():
    base = {"kind": "task", "engine": "infercache", "model": "m", "protocol": "-", "task": "t", "length": 10}
    records = [
        {**base, "method": "full", "budget": 1.0, "sample_id": "a", "score": 1.0, "cache_bytes": 1000},
        {**base, "method": "snapkv", "budget": 0.25, "protocol": "question_aware", "sample_id": "a", "score": 1.0, "cache_bytes": 250},
        {**base, "method": "snapkv", "budget": 0.25, "protocol": "question_aware", "sample_id": "b", "score": 0.0, "cache_bytes": 260},
    ]
    rows = {r["method"]: r for r in summarize(records)["rows"]}
    assert rows["snapkv"]["score"] == 0.5 and rows["snapkv"]["n"] == 2
    assert rows["snapkv"]["bytes_vs_full"] == pytest.approx(0.255)


@pytest.mark.parametrize("field,value,match", [("methods", ["nope"], "unknown method"), ("budgets", [2.0], r"\(0, 1\]"),
                                               ("tasks", ["nope"], "unknown task"), ("protocols", ["oracle"], "protocol"),
                                               ("peers", ["vllm"], "peer")])
def test_bad_config_is_a_clear_error(field, value, match):
    config = BenchConfig(**{field: value})
    with pytest.raises((ValueError, KeyError), match=match):
        config.validate()
