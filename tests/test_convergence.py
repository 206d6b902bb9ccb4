"""benchmarks/convergence.py and benchmarks/demo.py: the speedup rule on hand-made curves, and both scripts end to end
in a tiny configuration (real train.py runs on a tiny ImageFolder, a few updates)."""
import csv
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import convergence  # noqa: E402
import demo  # noqa: E402

BUDGETS = [1, 2, 4]
BASE = [60.0, 70.0, 80.0]  # the baseline's target is 80 (its mean at 4 epochs)


@pytest.mark.parametrize("tract, e_star, bound, speedup", [
    ([70.0, 80.0, 85.0], 2.0, False, 2.0),                              # reaches 80 exactly at 2 epochs
    ([65.0, 75.0, 85.0], 2 * 2 ** 0.5, False, 2 ** 0.5),                # halfway from 75 to 85: 2^1.5 epochs
    ([75.0, 81.0, 79.0], 2 ** (5 / 6), False, 4 / 2 ** (5 / 6)),        # first crossing counts, not the last point
    ([81.0, 82.0, 83.0], 1.0, True, 4.0),                               # already at the smallest budget: a bound
    ([70.0, 75.0, 79.0], None, False, 0.0),                             # never reached
])
def test_speedup_interpolates_log_linearly_to_the_first_crossing_of_the_baselines_final_mean(tract, e_star, bound,
                                                                                             speedup):
    got, got_bound = convergence.reach_budget(BUDGETS, tract, BASE[-1])
    assert got_bound is bound
    assert got == pytest.approx(e_star, rel=1e-12) if e_star else got is None
    assert convergence.speedup(BUDGETS, BASE, tract) == pytest.approx(speedup, rel=1e-12)


def test_bootstrap_interval_of_speedup_and_difference_comes_from_resampled_seeds():
    # The baseline's two seeds at 4 epochs (79, 81) resample to a target of 79, 80 or 81 (1/4, 1/2, 1/4); TrAct is
    # the same on both seeds: 60 / 80 / 90. Targets 79 and 80 are crossed between 1 and 2 epochs at 2^0.95 and 2
    # epochs, 81 between 2 and 4 at 2^1.1 epochs: the 2.5% and 97.5% percentiles are 4 / 2^1.1 and 4 / 2^0.95.
    base = {1: [50.0, 50.0], 2: [60.0, 60.0], 4: [79.0, 81.0]}
    tract = {1: [60.0, 60.0], 2: [80.0, 80.0], 4: [90.0, 90.0]}
    s = convergence.bootstrap(base, tract, n_boot=2000, seed=0)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["speedup_ci"] == pytest.approx((4 / 2 ** 1.1, 4 / 2 ** 0.95), rel=1e-9)
    assert s["bound"] is False
    assert s["diff"][4] == pytest.approx((10.0, 9.0, 11.0))
    assert s["diff"][1] == pytest.approx((10.0, 10.0, 10.0))


def test_speedup_text_marks_not_reached_and_lower_bounds():
    assert convergence.format_speedup(0.0, BUDGETS) == "<1 (not reached)"
    assert convergence.format_speedup(4.0, BUDGETS) == ">=4.00x"
    assert convergence.format_speedup(1.5, BUDGETS) == "1.50x"


def tiny_train_args(root: Path):
    return ["--train-args", "--data-set", "IMNET", "--data-path", str(root), "--batch-size", "4"]


def test_benchmark_writes_csv_table_and_plot_and_a_rerun_skips_finished_runs(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--out-dir", str(out), "--budgets", "1", "2", "--seeds", "0", "--lambdas", "0.1", "--lr", "adam=0.001",
            "--studies", "main", "--updates-per-epoch", "1", "--n-boot", "20", *tiny_train_args(tiny_imagefolder)]
    convergence.main(argv)
    first = capsys.readouterr().out
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["lam"], r["budget"]) for r in rows) == [("0.0", "1"), ("0.0", "2"), ("0.1", "1"), ("0.1", "2")]
    assert all(0 <= float(r["acc1"]) <= 100 and r["updates_per_epoch"] == "1" for r in rows)
    table = (out / "results.md").read_text()
    assert "| vanilla |" in table and "| TrAct λ 0.1 |" in table and "speedup" in table
    assert (out / "convergence.png").stat().st_size > 0
    progress = lambda text: [line for line in text.splitlines() if line.startswith("[")]  # noqa: E731
    assert len(progress(first)) == 4
    assert not any((out / "runs").glob("*/checkpoints"))  # a finished run keeps its log, not its checkpoints

    convergence.main(argv)  # resumed: everything is in the CSV, nothing runs again
    assert progress(capsys.readouterr().out) == []
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_demo_runs_the_maps_centre_setting_side_by_side_and_writes_plot(tiny_imagefolder, tmp_path, capsys):
    import yaml

    out = tmp_path / "demo"
    demo.main(["--epochs", "2", "--updates-per-epoch", "1", "--out-dir", str(out),
               "--map-csv", str(tmp_path / "no.csv"), *tiny_train_args(tiny_imagefolder)])
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| epoch")]
    assert [line.split(" | ")[0] for line in lines] == ["| 1", "| 2"]
    assert "--no-tract" in text and "--tract --tract-lambda 0.1" in text
    # the printed commands set the budget and the per-epoch evaluation once each, over the centre's values
    assert text.count("--epochs 2 ") == text.count("--val-interval 1 ") == 2 and "--epochs 3" not in text
    assert "How to read it" in text and "The map has no results yet" in text
    assert (out / "demo.png").stat().st_size > 0
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    logs = [convergence.read_log(p) for p in runs]
    assert [len(log) for log in logs] == [2, 2]  # evaluated after every epoch, not only at the end as in the map
    assert not any(math.isnan(log[-1]["test_acc1"]) for log in logs)
    for run in runs:  # the map's centre (the second setting), with the demo's tiny budget on top
        args = yaml.safe_load((run / "args.yaml").read_text())
        assert (args["model"], args["model_kwargs"]) == ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 64,
                                                                                  "depth": 2, "num_heads": 2})
        assert (args["input_size"], args["opt"], args["lr"], args["unscale_lr"], args["smoothing"]) == (
            32, "adamw", 1e-3, True, 0.0)
        assert (args["epochs"], args["max_updates_per_epoch"], args["batch_size"]) == (2, 1, 4)
    assert [yaml.safe_load((r / "args.yaml").read_text())["tract"] for r in runs] == [True, False]  # tract, vanilla


def write_map_csv(path, results):
    """A map CSV in tract_map's format: {(setting, arm): [top-1 of seed 0, seed 1, ...]}."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "arm", "seed", "acc1", "acc5", "wall_s"])
        for (setting, arm), accs in results.items():
            for seed, acc in enumerate(accs):
                writer.writerow([setting, arm, seed, acc, 90.0, 10.0])


def test_demo_reads_how_often_tract_was_ahead_across_the_map_and_at_its_setting(tmp_path):
    path = tmp_path / "results.csv"
    write_map_csv(path, {("centre", "vanilla"): [50.0, 52.0, 51.0], ("centre", "tract"): [53.0, 55.0, 54.0],  # +3 x3
                         ("patch8", "vanilla"): [50.0, 50.0, 50.0], ("patch8", "tract"): [48.0, 47.0, 48.0],  # -2,-3,-2
                         ("gray", "vanilla"): [40.0, 40.0, 40.0], ("gray", "tract"): [41.0, 38.0, 40.0],      # +1,-2,0
                         ("aug-weak", "vanilla"): [50.0, 52.0, 51.0], ("aug-weak", "tract"): [53.0, 55.0, 54.0],
                         ("smooth", "vanilla"): [40.0, 40.0], ("smooth", "tract"): [45.0, 45.0]})  # 2 seeds
    text = demo.map_reading("centre", path, tmp_path / "no-old.csv", tmp_path / "no-speedup.csv")
    # aug-weak is the centre's run and smooth has 2 seeds: neither is counted. patch8's differences (-2, -3, -2)
    # have the t-interval -7/3 +- 4.302653 * sqrt(1/3) / sqrt(3) = [-3.77, -0.90]: below 0.
    assert ("has 3 distinct settings with at least 3 seeds: the 95% t-interval lies above 0 in 1, below 0 in 1 and "
            "contains 0 in 1, not adjusted for looking at 3 settings" in text)
    assert "TrAct's mean was ahead in 1." in text
    assert "At this setting (the centre setting) the map measured +3.00 points [+3.00, +3.00] (95% t-interval) over " \
           "3 seeds, TrAct ahead on 3 of them" in text
    assert "measured +5.00 points over 2 seeds" in demo.map_reading("smooth", path, tmp_path / "no-old.csv")
    assert demo.DEFAULT_SEED != 0 and demo.DEFAULT_SEED not in demo.speedup.GRID_SEEDS  # seeds that chose things
    assert "no finished pair for this setting (lr-low)" in demo.map_reading("lr-low", path, tmp_path / "no-old.csv")
    assert demo.map_reading("centre", tmp_path / "missing.csv", tmp_path / "no-old.csv").startswith(
        "The map has no results yet")


def test_resnet18_cifar_keeps_full_resolution_in_the_stem_and_tract_wraps_its_first_conv():
    import timm
    import torch

    import tract.models  # noqa: F401  (registers the model with timm)
    from tract import apply_tract

    model = timm.create_model("resnet18_cifar", num_classes=10, in_chans=1)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    # 28 px: the stem keeps 28, the stages halve to 14, 7, 4 (the ImageNet stem would end at 1 x 1)
    assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 512, 4, 4)
    assert apply_tract(model) == "conv1"


def test_mean_std_flags_reach_the_transforms_and_a_wrong_count_is_refused(monkeypatch):
    import train
    import tract.data
    from tract.config import parse_args
    from tract.errors import ConfigError

    seen = []
    monkeypatch.setattr(tract.data, "build_transform", lambda *a, **kw: seen.append((kw["mean"], kw["std"])) or (
        lambda image: image))
    monkeypatch.setattr(tract.data, "check_dataset", lambda *a, **kw: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit):
        train.main(["--in-chans", "1", "--mean", "0", "--std", str(1 / 255), "--dry-run"])
    assert seen == [([0.0], [1 / 255])] * 2  # train and eval: x / (1/255), inputs in [0, 255]
    with pytest.raises(ConfigError, match="--std needs 1 finite value"):
        parse_args(["--in-chans", "1", "--std", "1", "1"])
    with pytest.raises(ConfigError, match="--std must be > 0"):
        parse_args(["--in-chans", "1", "--std", "0"])
