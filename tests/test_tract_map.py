"""benchmarks/tract_map.py: the paired statistics against hand-computed values, the settings' command lines, and a
resumed map that runs only what its CSV lacks."""
import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stats  # noqa: E402
import tract_map  # noqa: E402
from records import PROVENANCE  # noqa: E402


def test_paired_difference_pairs_by_seed_with_a_t_interval_and_exact_sign_flip_p():
    vanilla = {0: 40.0, 1: 50.0, 2: 60.0, 7: 10.0}  # seed 7 has no TrAct run: not a pair, left out
    tract = {0: 39.0, 1: 52.0, 2: 62.0}
    s = stats.paired(vanilla, tract)
    assert s["n"] == 3 and s["ahead"] == 2
    assert s["diff"] == pytest.approx(1.0)
    assert s["vanilla"] == pytest.approx(50.0) and s["tract"] == pytest.approx(51.0)
    # Differences -1, 2, 2: sd = sqrt(3), so the half-width is t(0.975, 2) * sqrt(3) / sqrt(3) = 4.302653.
    assert (s["low"], s["high"]) == pytest.approx((1 - 4.302653, 1 + 4.302653), rel=1e-6)
    # Sign patterns of (1, 2, 2) whose |sum| >= 3: (+,+,+), (-,-,-), (-,+,+), (+,-,-): 4 of 8.
    assert s["p_flip"] == pytest.approx(0.5)


def test_paired_interval_of_identical_differences_is_a_point():
    s = stats.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert (s["diff"], s["low"], s["high"]) == pytest.approx((0.5, 0.5, 0.5))


def test_paired_without_common_seeds_is_none():
    assert stats.paired({0: 1.0}, {1: 2.0}) is None


def _flag_values(args, flag):
    i = args.index(flag)
    out = []
    for a in args[i + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def test_a_setting_replaces_the_centres_flags_instead_of_repeating_them():
    for name in tract_map.SETTINGS:
        args = tract_map.train_args(name)
        flags = [a for a in args if a.startswith("--")]
        assert len(flags) == len(set(flags)), name
        # One evaluation, after the last epoch: --val-interval is the budget.
        assert _flag_values(args, "--val-interval") == _flag_values(args, "--epochs"), name
    assert _flag_values(tract_map.train_args("lr-low"), "--lr") == ["3e-4"]
    assert _flag_values(tract_map.train_args("patch8"), "--model-kwargs")[0] == "patch_size=8"
    assert _flag_values(tract_map.train_args("budget9"), "--epochs") == ["9"]
    assert "--src" in tract_map.train_args("aug-weak") and "--src" not in tract_map.train_args("centre")


def test_arms_differ_only_in_tract_flags():
    v = tract_map.command("centre", "vanilla", 3, Path("/x"))
    t = tract_map.command("centre", "tract", 3, Path("/x"))
    assert "--no-tract" in v and "--tract" not in v
    assert _flag_values(t, "--tract-lambda") == ["0.1"]
    assert [a for a in v if a != "--no-tract"] == [a for a in t if a not in ("--tract", "--tract-lambda", "0.1")]
    assert _flag_values(v, "--seed") == ["3"]


def test_execute_runs_only_what_the_csv_lacks_and_report_reads_both_csvs(tmp_path, monkeypatch):
    ran = []

    def fake_train(cmd, output_dir, threads=1):
        seed = int(_flag_values(cmd, "--seed")[0])
        tract = "--tract" in cmd
        ran.append((output_dir.name, seed, tract))
        return [{"test_acc1": 50.0 + seed + (2.0 if tract else 0.0), "test_acc5": 90.0}]

    monkeypatch.setattr(tract_map, "train", fake_train)
    with open(tmp_path / "results.csv", "w", newline="") as f:  # one run already done
        w = csv.DictWriter(f, fieldnames=[*tract_map.FIELDS, *PROVENANCE])
        w.writeheader()
        w.writerow({"setting": "centre", "arm": "vanilla", "seed": 0, "acc1": 50.0, "acc5": 90.0, "wall_s": 1.0})
    tract_map.execute(tmp_path, ["centre", "gray", "aug-weak"], [0, 1, 2], jobs=2)
    assert len(ran) == 17 and ("centre-vanilla-s0", 0, False) not in ran
    old = tmp_path / "old.csv"
    old.write_text("study,model,opt,lr,inputs,lam,budget,seed,acc1,acc5,wall_s,images_per_sec,updates_per_epoch\n"
                   "main,vit,adam,0.001,standardised,0.0,4,0,50.0,90,1,1,50\n"
                   "main,vit,adam,0.001,standardised,0.1,4,0,47.0,90,1,1,50\n"
                   "main,vit,adam,0.001,standardised,0.1,2,0,99.0,90,1,1,50\n")
    text = tract_map.report(tmp_path, old)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "**+2.00** [+2.00, +2.00]" in lines["centre"] and "3/3 |" in lines["centre"]
    # One seed: a mean difference, no interval, and outside the tally; aug-weak is the centre's run: not counted.
    assert "**-3.00** (no interval: 1 seed(s))" in lines["old-main"] and "0/1 |" in lines["old-main"]
    assert "(the same run as centre)" in lines["aug-weak"]
    assert "Of 2 distinct settings with at least 3 seeds, the 95% t-interval of TrAct - vanilla lies above 0 in 2" in text
    with open(tmp_path / "results.csv") as f:  # every row the map appended carries its provenance
        appended = list(csv.DictReader(f))[1:]
    assert appended and all(r["commit"] and r["command"].startswith("python train.py ") for r in appended)
    assert (tmp_path / "map.png").stat().st_size > 0
