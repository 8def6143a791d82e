"""The main job: Pareto fronts on hand-made results, and `leancnn bench` end to end on synthetic data."""
from __future__ import annotations

import json
import re

import pytest

from leancnn.runs import read_result
from leancnn.bench import COLUMNS, BenchPlan, Candidate, default_candidates, quick_scale, run_bench, table_rows, write_outputs
from leancnn.cli import main
from leancnn.kernels.sparse import DENSE_PACKED, PASS_CHOICES
from leancnn.report.budget import DENSE_ONNX_LABEL, Budget, default_budget
from leancnn.measure.pareto import pareto_front


@pytest.fixture(autouse=True)
def _two_timing_rounds(monkeypatch):
    # The bench times its candidates in rounds that take turns; two rounds exercise the turns
    # as well as five, in less of the suite's time.
    import leancnn.bench as bench

    monkeypatch.setattr(bench, "LATENCY_ROUNDS", 2)


def test_pareto_front_on_hand_made_points():
    #          a     b     c     d     e     f
    costs = [10.0, 20.0, 15.0, 30.0, 20.0, 10.0]
    accs = [0.80, 0.90, 0.78, 0.89, 0.85, 0.80]
    # c costs more than a and is less accurate; d costs more than b and is less accurate;
    # e costs the same as b and is less accurate; f duplicates a (the first stays).
    assert pareto_front(costs, accs) == [0, 1]
    assert pareto_front([1, 2, 3], [0.1, 0.2, 0.3]) == [0, 1, 2]
    assert pareto_front([3, 2, 1], [0.1, 0.2, 0.3]) == [2]
    assert pareto_front([], []) == []


def test_default_candidates_cover_registered_methods():
    labels = [c.label for c in default_candidates()]
    assert labels[0] == "dense" and {"PS4_P4", "PSD2_P8", "PS1_P9"} <= set(labels)
    assert [c.methods for c in default_candidates(["psconv:k=2,period=6"])][1] == ["psconv:k=2,period=6"]
    quick = [c.label for c in default_candidates(quick=True)]
    # csr, synflow and admm train too slowly for it; the post-training ones come last (they compress dense).
    assert quick == ["dense", "circulant:block=4", "dnr:density=0.05,attack=none", "PS4_P4", "bcr:density=0.1",
                     "magprune:density=0.1,attack=none"]
    assert {"synflow:density=0.1", "admm:density=0.1,bits=8"} <= set(labels)
    assert "vip" not in " ".join(labels), "post-training methods without bench strengths are left out"


def test_a_post_training_candidate_compresses_the_dense_run(tmp_path):
    rows = run_bench(_plan([Candidate("dense", []), Candidate("bcr", ["bcr:density=0.25"])]), tmp_path, progress=False)
    dense, bcr = rows[0], rows[-1]
    assert bcr["label"] == "bcr" and "error" not in bcr
    assert read_result(tmp_path / "runs" / "bcr").extra["compress"]["from"] == str(tmp_path / "runs" / "dense")
    assert bcr["params_nonzero"] < 0.5 * dense["params_nonzero"] and bcr["latency_b64_ms"] > 0
    alone = run_bench(_plan([Candidate("bcr", ["bcr:density=0.25"])]), tmp_path / "alone", progress=False)
    assert alone[0]["error"] == "bcr compresses the dense run, which did not finish"


def _plan(candidates):
    return BenchPlan(data="synthetic", model="resnet20", width=0.25, epochs=1, train_subset=400, test_subset=200,
                     candidates=candidates)


def test_bench_end_to_end_skips_done_and_reports_failures(tmp_path, capsys):
    candidates = [Candidate("dense", []), Candidate("PS4_P4", ["PS4_P4"]),
                  Candidate("broken", ["psconv:layers=nothing-matches"])]
    rows = run_bench(_plan(candidates), tmp_path, progress=False)
    # The dense model in ONNX Runtime is timed beside the candidates (the test extra installs it).
    assert [r["label"] for r in rows] == ["dense", DENSE_ONNX_LABEL, "PS4_P4", "broken"]
    onnx_row = rows.pop(1)
    assert onnx_row["test_acc"] == rows[0]["test_acc"] and onnx_row["latency_b1_ms"] > 0
    assert onnx_row["latency_b1_ms"] != rows[0]["latency_b1_ms"], "timed on its own, not copied from dense"
    assert "no 3x3 convolution to convert" in rows[2]["error"]
    assert rows[1]["macs_effective"] < rows[0]["macs_effective"]
    files = write_outputs(rows, tmp_path, "test bench", ["a note"], Budget.parse("latency_ms=1000"))
    html = files.report.read_text()
    assert "data:image/png;base64," in html and "PS4_P4" in html and "no 3x3 convolution" in html
    # The report leads with the answer; the most accurate candidate fits a 1 s budget.
    best = max(rows[:2], key=lambda r: (r["test_acc"], -r["latency_b1_ms"]))["label"]
    assert html.index("id='answer'") < html.index("<table") and f"Ship {best}:" in html
    assert re.search(r'<tr class="[a-z ]*chosen"><td>' + best + "</td>", html), "the answer's row is marked"
    assert files.plots["latency_b1"].read_bytes().startswith(b"\x89PNG")
    assert json.loads(files.recommendation_file.read_text())["chosen"] == best
    # Per candidate: PS4_P4's pSConv layers have deploy plans; every candidate has its layer times.
    ps = next(r for r in rows if r["label"] == "PS4_P4")
    allowed = {"dense", "dense-other-format", DENSE_PACKED, *PASS_CHOICES}
    assert ps["deploy_plan"] and {p["choice"] for p in ps["deploy_plan"]} <= allowed
    assert html.count("<details") == 2 and html.count("<details open>") == 1 and ps["deploy_plan"][0]["layer"] in html
    assert {t["type"] for t in rows[0]["layer_times"]} >= {"SparseConvInference", "Linear"}   # dense deploys onto planned layers too
    assert files.plots["macs"].read_bytes().startswith(b"\x89PNG")
    assert "PS4_P4" in files.markdown.read_text()
    assert len(files.csv.read_text().splitlines()) == 4
    first_result = (tmp_path / "runs" / "dense" / "result.json").stat().st_mtime_ns
    again = run_bench(_plan(candidates[:1]), tmp_path, progress=False)
    assert (tmp_path / "runs" / "dense" / "result.json").stat().st_mtime_ns == first_result, "finished runs are skipped"
    assert again[0]["test_acc"] == rows[0]["test_acc"]


def test_bench_cli_rejects_bad_specs_before_training(tmp_path, capsys):
    code = main(["bench", "--data", "synthetic", "--methods", "psconv:k=12", "--out", str(tmp_path / "b")])
    assert code == 2
    assert "k must be in 1..9" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_report_command_from_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, extra in (("d", []), ("p", ["--method", "PS1_P9"])):
        assert main(["train", "--data", "synthetic", "--width", "0.25", "--epochs", "1", "--train-subset", "300",
                     "--test-subset", "100", "--out", f"runs/{name}", "--no-progress", "--json", *extra]) == 0
    capsys.readouterr()
    assert main(["report", "runs/d", "runs/p", "--out", "rep"]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "psconv:k=1" in (tmp_path / "rep" / "results.md").read_text()
    capsys.readouterr()
    assert main(["report", "runs/d", "runs/p", "--out", "rep2", "--budget", "latency_ms=0.000001"]) == 0
    assert "Nothing of the 3 candidates fits" in capsys.readouterr().out   # d, d in ONNX Runtime, p
    assert main(["report", "runs/d", "--out", "rep3", "--budget", "storage_kib=1e9"]) == 0
    # Both dense rows fit; the same accuracy and storage: the faster of the two is the answer.
    assert re.search(r"Ship dense(, ONNX Runtime)?:", capsys.readouterr().out)


def test_speed_ups_are_against_the_faster_dense_with_pytorchs_in_brackets():
    def row(label, b1, b64):
        return {"label": label, "test_acc": 0.9, "params_nonzero": 10, "macs_effective": 100, "storage_bytes": 40,
                "latency_b1_ms": b1, "latency_b64_ms": b64}
    rows = [row("dense", 2.0, 64.0), row(DENSE_ONNX_LABEL, 1.0, 80.0), row("PS4_P4", 0.5, 32.0)]
    lines, _ = table_rows(rows)
    speedups = {line[0]: (line[COLUMNS.index("speed-up b1")], line[COLUMNS.index("speed-up b64")]) for line in lines}
    # batch 1: ONNX Runtime is the faster dense (1.0 ms); batch 64: PyTorch is (64 ms), nothing in brackets.
    assert speedups == {"dense": ("0.50x (1.00x)", "1.00x"), DENSE_ONNX_LABEL: ("1.00x (2.00x)", "0.80x"),
                        "PS4_P4": ("2.00x (4.00x)", "2.00x")}
    assert default_budget(rows).limits == {"latency_ms": round(1.0 / 1.01, 4)}
    assert default_budget(rows[:1] + rows[2:]).limits == {"latency_ms": round(2.0 / 1.01, 4)}   # without ONNX


def test_time_limit_cuts_epochs_then_images(monkeypatch):
    import leancnn.bench as bench

    monkeypatch.setattr(bench, "_seconds_per_image", lambda plan: 0.01)
    plan = _plan([Candidate("dense", []), Candidate("PS4_P4", ["PS4_P4"])])
    plan.epochs, plan.train_subset = 10, None
    # 2 candidates, 10 epochs x 60000 images x 0.0115 s is far over 1 minute: both cuts happen.
    bench.fit_time(plan, max_minutes=1, train_size=60000)
    assert plan.epochs == 1 and plan.train_subset is not None and plan.train_subset < 60000
    assert [c.split(" ")[0] for c in plan.cuts] == ["epochs", "training"]
    roomy = _plan([Candidate("dense", [])])
    bench.fit_time(roomy, max_minutes=60, train_size=400)
    assert roomy.cuts == [] and roomy.epochs == 1


def test_the_quick_bench_says_how_far_from_a_full_one_it_is():
    plan = _plan([Candidate("dense", [])])
    plan.epochs, plan.train_subset = 4, 10000
    assert quick_scale(plan, 60000).startswith("Quick bench: each candidate sees 40,000 training images (4 epochs on "
                                               "10,000), 1/8 of a full bench (5 epochs on all 60,000)")
    plan.epochs, plan.train_subset = 1, None   # the whole set at 1 epoch of 5
    assert "sees 600 training images (1 epoch on 600), 1/5 of a full bench" in quick_scale(plan, 600)
