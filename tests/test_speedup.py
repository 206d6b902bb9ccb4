"""benchmarks/speedup.py and benchmarks/stats.py: the speed-up on constructed curves with known answers, the interval
and test code against scipy and hand enumeration, the protocol's plan (grid first, the tuned rate per budget, a fixed
run order), and provenance on every CSV row."""
import csv
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import records  # noqa: E402
import speedup  # noqa: E402
import stats  # noqa: E402
import tract_map  # noqa: E402
from convergence import load_rows as load_convergence_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BUDGETS = speedup.BUDGETS  # 3, 6, 12, 24


def curve(shift: float, offset: float = 0.0):
    """An accuracy curve linear in log budget, as if trained ``shift`` times longer: a(E) = 40 + 10 log2(shift E)."""
    return [40 + 10 * math.log2(shift * e) + offset for e in BUDGETS]


@pytest.mark.parametrize("shift", [1.0, 1.25, 2.0, 4.0])
def test_a_curve_shifted_by_a_factor_in_budget_has_that_speedup(shift):
    assert stats.speedup(BUDGETS, curve(1.0), curve(shift)) == pytest.approx(shift, rel=1e-12)


def test_speedup_is_zero_when_never_reached_and_capped_when_reached_at_the_smallest_budget():
    assert stats.speedup(BUDGETS, curve(1.0), curve(0.5)) == 0.0
    assert stats.speedup(BUDGETS, curve(1.0), curve(16.0)) == pytest.approx(8.0)
    assert speedup.format_speedup(0.0) == "< 1 (not reached)"
    assert speedup.format_speedup(8.0) == ">= 8x"
    assert speedup.format_speedup(2.0) == "2.00x"


def test_bootstrap_interval_of_identical_seeds_is_the_point_and_brackets_a_spread():
    base = np.array([curve(1.0)] * 8)
    tract = np.array([curve(2.0)] * 8)
    assert stats.bootstrap_speedup(BUDGETS, base, tract, n_boot=500) == pytest.approx((2.0, 2.0))
    # Seeds whose own speed-ups are 1.5 ... 2.5: the resampled mean curves' speed-ups lie inside that range.
    tract = np.array([curve(s) for s in np.linspace(1.5, 2.5, 8)])
    low, high = stats.bootstrap_speedup(BUDGETS, base, tract, n_boot=2000)
    assert 1.5 < low < 2.0 < high < 2.5


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.5], [-0.3, 0.1, 0.7, 1.2, -0.4, 0.9, 0.2, 0.05], [5.0, 5.5]])
def test_t_interval_and_p_value_match_scipy(values):
    mean, low, high = stats.t_interval(values)
    ref = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (low, high) == pytest.approx(ref, rel=1e-12)
    assert mean == pytest.approx(np.mean(values))
    assert stats.t_pvalue(values) == pytest.approx(scipy_stats.ttest_1samp(values, 0.0).pvalue, rel=1e-10)


def test_sign_flip_p_value_is_the_exact_enumeration():
    # Three seeds, all positive: only the all-positive and all-negative patterns are as extreme: 2 / 8.
    assert stats.sign_flip_pvalue([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # Eight seeds all positive: 2 / 256, the smallest p-value 8 seeds can give.
    assert stats.sign_flip_pvalue([0.5] * 8) == pytest.approx(2 / 256)
    d = [1.0, -2.0, 3.0, 0.5]
    sums = [abs(sum(s * x for s, x in zip(signs, d))) for signs in itertools.product((-1, 1), repeat=4)]
    assert stats.sign_flip_pvalue(d) == pytest.approx(sum(v >= abs(sum(d)) for v in sums) / 16)


def test_holm_adjusts_step_down_and_keeps_order():
    # Sorted 0.01, 0.02, 0.04 over 3: 0.03, max(0.03, 0.04), max(0.04, 0.04).
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_log_budget_area_is_the_mean_over_log_budget():
    # A curve linear in log2 budget from 50 to 80 has mean 65 over [log 3, log 24].
    assert stats.log_budget_area(BUDGETS, [50, 60, 70, 80]) == pytest.approx(65.0)
    # Unequal steps weigh by their width in log budget: budgets 1, 2, 8 (widths log 2 and 2 log 2).
    assert stats.log_budget_area([1, 2, 8], [0, 3, 3]) == pytest.approx((1.5 * 1 + 3 * 2) / 3)


def grid_rows(best_per_budget):
    rows = []
    for b in BUDGETS:
        for lr in speedup.LR_GRID:
            for s in speedup.GRID_SEEDS:
                acc = 60.0 if speedup.same_lr(lr, best_per_budget[b]) else 50.0
                rows.append({"setting": "centre", "phase": "grid", "arm": "vanilla", "lr": float(f"{lr:.6g}"),
                             "budget": b, "seed": s, "acc1": acc})
    return rows


def test_the_tuned_rate_is_chosen_per_budget_and_tract_runs_at_it():
    best = {3: 1e-2, 6: 10 ** -2.5, 12: 1e-3, 24: 10 ** -3.5}
    rows = grid_rows(best)
    for b in BUDGETS:
        assert speedup.chosen_lr(rows, "centre", b) == best[b]
    main = [r for r in speedup.plan(rows, ["centre"]) if r[1] == "main"]
    assert len(main) == 2 * len(BUDGETS) * len(speedup.SEEDS)
    assert all(r[3] == best[r[4]] for r in main)
    assert {r[5] for r in main}.isdisjoint(speedup.GRID_SEEDS)


def test_no_main_run_is_planned_before_its_budgets_grid_is_complete_and_a_failed_run_counts_as_worst():
    rows = grid_rows({b: 1e-3 for b in BUDGETS})
    partial = [r for r in rows if not (r["budget"] == 24 and r["seed"] == 101)]
    main = [r for r in speedup.plan(partial, ["centre"]) if r[1] == "main"]
    assert main and all(r[4] != 24 for r in main)
    for r in rows:  # the best rate diverged on one seed: the next best is chosen
        if r["budget"] == 3 and speedup.same_lr(r["lr"], 1e-3) and r["seed"] == 100:
            r["acc1"] = float("nan")
    assert speedup.chosen_lr(rows, "centre", 3) != 1e-3


def test_run_order_is_fixed_by_the_protocol_and_whole_seeds_come_first():
    order = speedup.main_order("centre")
    assert order == speedup.main_order("smooth")  # the same generator: the same order for every setting
    seeds = [seed for _, _, seed in order]
    assert sorted(set(seeds)) == list(speedup.SEEDS)
    per_seed = 2 * len(BUDGETS)
    assert all(len(set(seeds[i:i + per_seed])) == 1 for i in range(0, len(seeds), per_seed))
    assert seeds[::per_seed] != list(speedup.SEEDS)  # shuffled, not 0..7


def test_execute_records_provenance_and_a_rerun_runs_nothing(tmp_path, monkeypatch):
    ran = []

    def fake_train(cmd, folder, threads=1):
        ran.append(cmd)
        epochs, lr = int(cmd[cmd.index("--epochs") + 1]), float(cmd[cmd.index("--lr") + 1])
        shift = 2.0 if "--tract" in cmd else 1.0
        return [{"test_acc1": 40 + 10 * math.log2(shift * epochs) - abs(math.log10(lr) + 3), "test_acc5": 90.0}]

    monkeypatch.setattr(speedup, "train", fake_train)
    speedup.execute(tmp_path, tmp_path / "runs", ["centre"], jobs=2)
    assert len(ran) == len(BUDGETS) * len(speedup.LR_GRID) * 2 + 2 * len(BUDGETS) * len(speedup.SEEDS)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert r["commit"] and r["utc"].endswith("Z") and r["command"].startswith("python train.py ")
        assert r["machine"] and r["torch"] and r["timm"]
        assert f"--seed {r['seed']}" in r["command"] and f"--epochs {r['budget']}" in r["command"]
    text = speedup.report(tmp_path, ["centre"])
    assert "| centre | 8 |" in text and "**2.00x**" in text
    assert (tmp_path / "speedup.png").stat().st_size > 0
    ran.clear()
    speedup.execute(tmp_path, tmp_path / "runs", ["centre"], jobs=1)
    assert ran == []


def test_update_block_replaces_only_the_text_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- begin t -->\n<!-- end t -->\nmiddle\n<!-- begin u -->\nold\n<!-- end u -->\nafter\n")
    assert records.update_block(doc, "t", "line 1\nline 2\n")
    assert records.update_block(doc, "u", "new")
    assert doc.read_text() == ("before\n<!-- begin t -->\nline 1\nline 2\n<!-- end t -->\nmiddle\n<!-- begin u -->\n"
                               "new\n<!-- end u -->\nafter\n")
    assert records.block(doc, "t") == "line 1\nline 2" and records.block(doc, "u") == "new"
    assert not records.update_block(doc, "absent", "x") and not records.update_block(tmp_path / "none.md", "t", "x")


def test_the_docs_quote_exactly_what_the_committed_csvs_give():
    # What a reviewer's --report-only run would write: docs/results.md and README must already say it.
    doc, readme = ROOT / "docs" / "results.md", ROOT / "README.md"
    lines = tract_map.summarise(tract_map.load_rows(tract_map.COMMITTED / "results.csv"),
                                load_convergence_rows(ROOT / "docs" / "results" / "results.csv"))
    assert records.block(doc, "tract_map") == tract_map.map_text(lines).strip("\n")
    rows = speedup.load_rows(speedup.OUT_DIR / "results.csv")
    results = [r for r in (speedup.analyse(rows, s) for s in speedup.SETTINGS) if r]
    assert records.block(doc, "speedup") == speedup.report_text(results, rows)
    assert records.block(readme, "speedup-summary") == speedup.summary(results, rows)


def test_every_committed_speedup_row_comes_from_the_protocol_commit_or_later():
    # The protocol (this script and its analysis) was committed before the first run: every row names a clean commit
    # that descends from the one that added benchmarks/speedup.py.
    rows = speedup.load_rows(speedup.OUT_DIR / "results.csv")
    assert rows
    git = ["git", "-C", str(ROOT)]
    shallow = subprocess.run([*git, "rev-parse", "--is-shallow-repository"], capture_output=True, text=True)
    protocol = subprocess.run([*git, "log", "--diff-filter=A", "--format=%H", "--", "benchmarks/speedup.py"],
                              capture_output=True, text=True, check=True).stdout.split()[-1]
    for commit in {r["commit"] for r in rows}:
        assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), commit  # no "+dirty"
        if shallow.stdout.strip() != "true":  # a shallow clone has no history to check the order against
            assert subprocess.run([*git, "merge-base", "--is-ancestor", protocol, commit]).returncode == 0, commit


def test_no_interval_is_shown_before_the_protocols_eight_seeds_are_complete():
    rows = grid_rows({b: 1e-3 for b in BUDGETS})
    for seed in (0, 1, 2):
        for arm, shift in (("vanilla", 1.0), ("tract", 2.0 + seed / 10)):
            for b, acc in zip(BUDGETS, curve(shift)):
                rows.append({"setting": "centre", "phase": "main", "arm": arm, "lr": 1e-3, "budget": b, "seed": seed,
                             "acc1": acc, "acc5": 90.0})
    r = speedup.analyse(rows, "centre")
    assert r["seeds"] == [0, 1, 2] and math.isnan(r["low"])
    assert r["per_seed"] == pytest.approx([2.0, 2.1, 2.2])
    assert speedup.interval_text(r) == "none yet (3 of 8 seeds)" and speedup.inside_text(r) == "-"
