"""Side by side: the same model trained with and without TrAct, same seed, same budget, on Fashion-MNIST.

    bash scripts/env.sh python benchmarks/demo.py              # a few minutes on 2 CPU cores, no GPU
    bash scripts/env.sh python benchmarks/demo.py --seed 1     # another seed: how much of the gap is noise
    bash scripts/env.sh python benchmarks/demo.py --setting patch8   # another setting of the map

Both runs are ``python train.py ...`` (the commands are printed), one CPU thread each, in parallel, with the train.py
arguments of a setting of the map of where TrAct helps (benchmarks/tract_map.py; by default its centre), evaluated
after every epoch. Printed: a per-epoch table (test top-1 of both, wall time, images/s), how to read it (what the
map measured: across its settings and at this one, TrAct - vanilla paired by seed), and where the plot is.
"""
import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speedup  # noqa: E402
import tract_map  # noqa: E402
from convergence import ROOT, load_rows, train  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "results.csv"  # convergence.py's CSV: the map's old main setting
MAP_CSV = ROOT / "docs" / "results" / "tract_map" / "results.csv"
SPEEDUP_CSV = ROOT / "docs" / "results" / "speedup" / "results.csv"
# Seed 0 chose the map's centre (a user's first seed of it had TrAct ahead) and seeds 100-101 chose the speed-up
# benchmark's rates: the demo's default is a seed that chose nothing.
DEFAULT_SEED = 3


def map_reading(setting: str, csv_path: Path = MAP_CSV, old_csv: Path = RESULTS,
                speedup_csv: Path = SPEEDUP_CSV) -> str:
    """What the map (and, where it ran this setting, the speed-up benchmark) measured, as sentences."""
    rows = tract_map.summarise(tract_map.load_rows(csv_path), load_rows(old_csv))
    if not any(x["setting"] in tract_map.SETTINGS for x in rows):
        return (f"The map has no results yet ({csv_path} is missing or empty): run benchmarks/tract_map.py, or this "
                "demo with other --seed values, before reading a one-seed gap as an effect.")
    t = tract_map.tally(rows)  # the map's own count: distinct settings with enough seeds
    text = (f"The map (benchmarks/tract_map.py, TrAct - vanilla paired by seed) has {t['settings']} distinct "
            f"settings with at least {tract_map.MIN_SEEDS} seeds: the 95% t-interval lies above 0 in {t['ahead']}, "
            f"below 0 in {t['behind']} and contains 0 in {t['undecided']}, not adjusted for looking at "
            f"{t['settings']} settings (after Holm's correction: {t['ahead_holm']} ahead, {t['behind_holm']} "
            f"behind); TrAct's mean was ahead in {t['mean_ahead']}.")
    here = next((x for x in rows if x["setting"] == setting), None)
    if here is None:
        text += f" The map has no finished pair for this setting ({setting}) yet."
    else:
        spread = (f" [{here['low']:+.2f}, {here['high']:+.2f}] (95% t-interval)"
                  if here["n"] >= tract_map.MIN_SEEDS else "")
        text += (f" At this setting ({here['change']}) the map measured {here['diff']:+.2f} points{spread} over "
                 f"{here['n']} seeds, TrAct ahead on {here['ahead']} of them: one seed's gap above is one draw from "
                 "that spread.")
    found = speedup.analyse(speedup.load_rows(speedup_csv), setting) if setting in speedup.SETTINGS else None
    if found:
        text += (f" The speed-up benchmark (benchmarks/speedup.py, tuned baseline, {len(found['seeds'])} seeds) "
                 f"measured S = {speedup.format_speedup(found['speedup'])} at this setting, 95% bootstrap interval "
                 f"[{speedup.format_speedup(found['low'])}, {speedup.format_speedup(found['high'])}].")
    return text


def with_values(cmd: List[str], values: Dict[str, Optional[int]]) -> List[str]:
    """``cmd`` with each flag's value replaced (or the flag added); a value of None leaves the flag as it is."""
    cmd = list(cmd)
    for flag, value in values.items():
        if value is None:
            continue
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = str(value)
        else:
            cmd += [flag, str(value)]
    return cmd


def table(logs: List[List[dict]]) -> str:
    """The per-epoch comparison as a Markdown table (vanilla, TrAct)."""
    head = ("| epoch | vanilla top-1 | TrAct top-1 | TrAct − vanilla | vanilla s | TrAct s | vanilla img/s | "
            "TrAct img/s |")
    lines = [head, "|" + "---|" * 8]
    for base, tract in zip(*logs):
        lines.append(f"| {base['epoch']} | {base['test_acc1']:.2f}% | {tract['test_acc1']:.2f}% | "
                     f"{tract['test_acc1'] - base['test_acc1']:+.2f} | {base['epoch_time']:.0f} | "
                     f"{tract['epoch_time']:.0f} | {base['images_per_sec']:.0f} | {tract['images_per_sec']:.0f} |")
    return "\n".join(lines)


def plot(logs: List[List[dict]], lam: float, path: Path) -> None:
    """Test top-1 per epoch of both runs (TrAct solid, vanilla dashed, as in the paper's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for log, style, label in ((logs[0], "o--k", "vanilla"), (logs[1], "o-", f"TrAct (λ={lam:g})")):
        ax.plot([r["epoch"] for r in log], [r["test_acc1"] for r in log], style, label=label)
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="Fashion-MNIST, same seed and budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="centre", choices=list(tract_map.SETTINGS),
                   help="the map's setting whose train.py arguments both runs use")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget (one cosine schedule); default the setting's")
    p.add_argument("--updates-per-epoch", type=int, default=None,
                   help="updates per epoch (train.py --max-updates-per-epoch); default the setting's")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of both runs (default: one that chose nothing)")
    p.add_argument("--map-csv", type=Path, default=MAP_CSV, help="the map's CSV, read for how to read the result")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="run folders, table and plot; default output/demo/<YYYYmmdd-HHMMSS>")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="the rest goes to both train.py runs")
    cfg = p.parse_args(argv)
    cfg.out_dir = cfg.out_dir or ROOT / "output" / "demo" / time.strftime("%Y%m%d-%H%M%S")

    folders = [cfg.out_dir / f"{cfg.setting}-{arm}-s{cfg.seed}" for arm in ("vanilla", "tract")]
    if any(f.exists() for f in folders):
        raise SystemExit(f"demo.py: {cfg.out_dir} already holds these runs: pass another --out-dir")
    # The map evaluates once, at the end; the demo every epoch (evaluation leaves training's random stream alone).
    changes = {"--val-interval": 1, "--epochs": cfg.epochs, "--max-updates-per-epoch": cfg.updates_per_epoch}
    cmds = [with_values(tract_map.command(cfg.setting, arm, cfg.seed, folder), changes) + cfg.train_args
            for arm, folder in zip(("vanilla", "tract"), folders)]
    print("TrAct side by side, both in parallel, one CPU thread each:")
    for cmd in cmds:
        print("  python " + " ".join(c for c in cmd[1:]).replace(str(ROOT) + "/", ""))
    with ThreadPoolExecutor(2) as pool:
        logs = list(pool.map(train, cmds, folders))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    print()
    print(table(logs))
    base, tract = logs[0][-1]["test_acc1"], logs[1][-1]["test_acc1"]
    ratio = np.median([r["epoch_time"] for r in logs[1]]) / np.median([r["epoch_time"] for r in logs[0]])
    print(f"\nAfter {len(logs[0])} epochs: vanilla {base:.2f}%, TrAct {tract:.2f}% ({tract - base:+.2f} points); "
          f"TrAct's epoch took {ratio:.2f}x vanilla's (median; both shared this machine).")
    print("How to read it: both runs start from the same initialisation and see the same images in the same order; "
          "only the first layer's weight update differs. " + map_reading(cfg.setting, cfg.map_csv))
    plot(logs, tract_map.LAMBDA, cfg.out_dir / "demo.png")
    (cfg.out_dir / "demo.md").write_text(table(logs) + "\n")
    print(f"plot: {cfg.out_dir / 'demo.png'}  table: {cfg.out_dir / 'demo.md'}  runs: {folders[0].parent}")


if __name__ == "__main__":
    main()
