"""Side by side: the same model trained with and without TrAct, same seed, same budget, on Fashion-MNIST.

    bash scripts/env.sh python benchmarks/demo.py              # about 10 minutes on 2 CPU cores, no GPU
    bash scripts/env.sh python benchmarks/demo.py --seed 1     # another seed: how much of the gap is noise

Both runs are ``python train.py ...`` (the commands are printed), one CPU thread each, in parallel. Printed: a
per-epoch table (test top-1 of both, wall time, images/s), how to read it, and where the plot is. The setting is
the one benchmarks/convergence.py measured (docs/results/): see the README's "Results".
"""
import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import ROOT, Run, load_rows, read_log, train, train_command  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "results.csv"


def seed_spread(run: Run, csv_path: Path = RESULTS) -> str:
    """What the benchmark measured for this setting (vanilla's std over seeds, TrAct - vanilla), as a sentence."""
    rows = [r for r in load_rows(csv_path) if (r["model"], r["opt"], r["inputs"], r["budget"]) ==
            (run.model, run.opt, run.inputs, run.budget) and np.isclose(r["lr"], run.lr)
            and r["study"] not in ("lambda", "ablation")]
    base = [r["acc1"] for r in rows if r["lam"] == 0]
    tract = [r["acc1"] for r in rows if np.isclose(r["lam"], run.lam)]
    if len(base) < 2 or not tract:
        return ("The benchmark has not measured this setting: run benchmarks/convergence.py (or this demo with "
                "other --seed values) before reading a gap as an effect.")
    return (f"benchmarks/convergence.py measured this setting over {len(base)} seeds: vanilla "
            f"{np.mean(base):.2f} ± {np.std(base, ddof=1):.2f}%, TrAct {np.mean(tract):.2f} ± "
            f"{np.std(tract, ddof=1) if len(tract) > 1 else float('nan'):.2f}% (mean ± std) after {run.budget} "
            f"epochs. A gap smaller than about two of those standard deviations in one run is within seed noise.")


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
    p.add_argument("--model", default="vit", choices=["vit", "resnet"], help="the benchmark's model")
    p.add_argument("--opt", default="adam", choices=["adam", "sgd"], help="the benchmark's optimizer")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (the benchmark's grid choice)")
    p.add_argument("--inputs", default="standardised", choices=["standardised", "[0,1]", "[0,255]"])
    p.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda")
    p.add_argument("--epochs", type=int, default=4, help="epoch budget (one cosine schedule)")
    p.add_argument("--updates-per-epoch", type=int, default=50, help="updates of 128 images per epoch (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs")
    p.add_argument("--in-chans", type=int, default=1, help="input channels (1: Fashion-MNIST as grayscale)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="run folders, table and plot; default output/demo/<YYYYmmdd-HHMMSS>")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="the rest goes to both train.py runs")
    cfg = p.parse_args(argv)
    cfg.out_dir = cfg.out_dir or ROOT / "output" / "demo" / time.strftime("%Y%m%d-%H%M%S")

    runs = [Run(cfg.model, cfg.opt, cfg.lr, cfg.inputs, lam, cfg.epochs, cfg.seed) for lam in (0.0, cfg.lam)]
    folders = [cfg.out_dir / run.name() for run in runs]
    if any(f.exists() for f in folders):
        raise SystemExit(f"demo.py: {cfg.out_dir} already holds these runs: pass another --out-dir")
    cmds = [train_command(run, cfg.updates_per_epoch or None, cfg.in_chans, cfg.train_args, folder)
            for run, folder in zip(runs, folders)]
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
    print(f"\nAfter {cfg.epochs} epochs: vanilla {base:.2f}%, TrAct {tract:.2f}% ({tract - base:+.2f} points); "
          f"TrAct's epoch took {ratio:.2f}x vanilla's (median; both shared this machine).")
    print("How to read it: both runs start from the same initialisation and see the same images in the same order; "
          "only the first layer's weight update differs. " + seed_spread(runs[1]))
    plot(logs, cfg.lam, cfg.out_dir / "demo.png")
    (cfg.out_dir / "demo.md").write_text(table(logs) + "\n")
    print(f"plot: {cfg.out_dir / 'demo.png'}  table: {cfg.out_dir / 'demo.md'}  runs: {folders[0].parent}")


if __name__ == "__main__":
    main()
