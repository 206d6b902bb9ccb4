"""Does TrAct reach the baseline's accuracy in fewer epochs? The paper's protocol (section 4.1) at CPU scale.

    bash scripts/env.sh python benchmarks/convergence.py --quick          # ~10 minutes on 2 cores: table + plots
    nice bash scripts/env.sh python benchmarks/convergence.py             # the full mode (hours; resumable)
    bash scripts/env.sh python benchmarks/convergence.py --in-chans 3 --out-dir output/convergence-cifar10 \\
        --train-args --data-set CIFAR10 --data-path DIR --input-size 32 --model-kwargs patch_size=4

Every run is ``python train.py ...`` in its own folder (what users run), one epoch budget with its own cosine
schedule, and its final test top-1 is appended to ``results.csv`` as soon as it ends. Rerunning the same command
skips the runs already in the CSV, so an interrupted benchmark continues where it stopped.

The protocol, fixed before any result was looked at (the README states it too):

- Data: Fashion-MNIST (train.py's default); an "epoch" is ``--updates-per-epoch`` updates of batch 128 (50 in the
  full mode: 6,400 images, 0.107 of the training set, a fresh random subset every epoch), evaluated on the full test
  set; budgets of 1, 2 and 4 such epochs (50 to 200 updates: short of convergence, where the paper says TrAct
  matters most, and what 2 shared CPU cores allow); train.py's recipe otherwise, with DeiT's simple random crop
  (``--src``: pad 4 + crop + flip, the CIFAR augmentation the paper's models use), label smoothing 0.1, no warmup.
- Model: ``vit``: a plain patch-embedding ViT (``vit_pico_patch7_28``, one grayscale channel): 7-px patches give 16
  tokens and n = 49 inputs to the first layer (the paper's CIFAR ViT: 64 tokens, n = 48), width 96, 4 blocks.
  ``resnet``: ResNet-18 with the CIFAR stem (``resnet18_cifar``), only with ``--resnet``.
- Optimizers: ``adam`` (AdamW, weight decay 0.05) and ``sgd`` (momentum 0.9, weight decay 5e-4), cosine schedule.
- Learning rate: the paper's rule, which favours the baseline: a small grid for the vanilla model at the largest
  budget (2 seeds), the best mean taken, and the same rate reused for every budget and for TrAct.
- Arms: vanilla, TrAct with lambda 0.05 / 0.1 / 0.2, the same seeds (same initialisation and data order).
- Reported: mean +- std of test top-1 per arm and budget; TrAct - vanilla with a 95% bootstrap interval; and the
  speedup, budget_max / E*, where E* is the smallest budget at which TrAct's mean accuracy reaches the baseline's
  mean at budget_max: the first interval between consecutive budgets where TrAct's mean curve crosses that target,
  interpolated linearly in log(epochs); "not reached" when it never does (speedup < 1), and a lower bound when the
  smallest budget already reaches it. The 95% interval is a bootstrap over seeds (the seeds of every arm and
  budget resampled independently, 2000 times).
- Studies, in the order they run (so a cut-short run still has the most important part): ``main`` (ViT, Adam, 5
  seeds), ``ablation`` (ViT, Adam, inputs in [0, 1] and [0, 255] without standardisation, paper Fig. 8, budget 2, 3
  seeds), ``lambda`` (lambda sweep 0.0125 ... 1.6, paper Fig. 6, budget 2, 3 seeds), ``sgd`` (ViT, SGD, 3 seeds),
  ``resnet`` (ResNet-18 CIFAR stem, Adam and SGD, 3 seeds; off unless ``--resnet``: too slow for 2 CPU cores).
"""
import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

MODELS = {  # train.py arguments of each model
    "vit": ["--model", "vit_pico_patch7_28"],
    "resnet": ["--model", "resnet18_cifar"],
}
OPTIMIZERS = {  # train.py arguments and the baseline's learning-rate grid (paper: Adam 1e-2 ... 1e-3.5, SGD ~0.08)
    "adam": (["--opt", "adamw", "--weight-decay", "0.05"], (10 ** -2.5, 1e-3, 10 ** -3.5)),
    "sgd": (["--opt", "sgd", "--momentum", "0.9", "--weight-decay", "5e-4"], (0.01, 0.03, 0.1)),
}
INPUTS = {  # input scaling: (mean, std) per channel; None = train.py's standardisation
    "standardised": None,
    "[0,1]": (0.0, 1.0),
    "[0,255]": (0.0, 1 / 255),
}
COMMON = ["--src", "--unscale-lr", "--batch-size", "128", "--warmup-epochs", "0", "--smoothing", "0.1",
          "--num-workers", "0", "--no-progress"]
LAMBDAS = (0.05, 0.1, 0.2)
SWEEP_LAMBDAS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
FIELDS = ("study", "model", "opt", "lr", "inputs", "lam", "budget", "seed", "acc1", "acc5", "wall_s",
          "images_per_sec", "updates_per_epoch")


@dataclass(frozen=True)
class Run:
    """One train.py run: a setting, an arm (lam 0 = vanilla), an epoch budget and a seed."""
    model: str
    opt: str
    lr: float
    inputs: str
    lam: float
    budget: int
    seed: int

    def name(self) -> str:
        """The run folder's name (unique per run)."""
        arm = "vanilla" if self.lam == 0 else f"tract{self.lam:g}"
        scale = {"standardised": "std", "[0,1]": "01", "[0,255]": "0255"}[self.inputs]
        return f"{self.model}-{self.opt}-lr{self.lr:.4g}-{scale}-{arm}-e{self.budget}-s{self.seed}"


def train_command(run: Run, updates_per_epoch: Optional[int], in_chans: int, extra: Sequence[str],
                  output_dir: Path) -> List[str]:
    """The train.py command line of a run."""
    cmd = [sys.executable, str(ROOT / "train.py"), *MODELS[run.model], "--in-chans", str(in_chans),
           *OPTIMIZERS[run.opt][0], *COMMON, "--lr", f"{run.lr:.6g}", "--epochs", str(run.budget),
           "--seed", str(run.seed)]
    if updates_per_epoch:
        cmd += ["--max-updates-per-epoch", str(updates_per_epoch)]
    if INPUTS[run.inputs] is not None:
        mean, std = INPUTS[run.inputs]
        cmd += ["--mean", *[f"{mean:.10g}"] * in_chans, "--std", *[f"{std:.10g}"] * in_chans]
    cmd += ["--tract", "--tract-lambda", f"{run.lam:g}"] if run.lam else ["--no-tract"]
    return cmd + list(extra) + ["--output-dir", str(output_dir)]


def read_log(output_dir: Path) -> List[dict]:
    """The per-epoch records of a train.py run (its log.txt JSON lines)."""
    path = output_dir / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(cmd: List[str], output_dir: Path, threads: int = 1) -> List[dict]:
    """Run train.py (``threads`` torch threads), its output to ``output_dir``.out; return its log records."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{output_dir}.out", "w") as out:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = Path(f"{output_dir}.out").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"train.py failed ({done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return read_log(output_dir)


# ---- statistics


def reach_budget(budgets: Sequence[float], means: Sequence[float], target: float) -> Tuple[Optional[float], bool]:
    """(E*, bound): the smallest budget where the mean curve reaches ``target``, log-linear between budgets.

    E* is None when the curve never reaches the target; ``bound`` is True when the smallest budget already does (E*
    is then that budget, an upper bound on the true E*).
    """
    if means[0] >= target:
        return float(budgets[0]), True
    for (e0, a0), (e1, a1) in zip(zip(budgets, means), zip(budgets[1:], means[1:])):
        if a0 < target <= a1:
            t = (target - a0) / (a1 - a0)
            return float(math.exp(math.log(e0) + t * (math.log(e1) - math.log(e0)))), False
    return None, False


def speedup(budgets: Sequence[float], base_means: Sequence[float], tract_means: Sequence[float]) -> float:
    """budget_max / E* for TrAct against the baseline's mean at budget_max; 0 when never reached."""
    e_star, _ = reach_budget(budgets, tract_means, base_means[-1])
    return budgets[-1] / e_star if e_star else 0.0


def interval(samples) -> Tuple[float, float]:
    """The 95% percentile interval, ends taken from the samples (no interpolation: "not reached" is 0, not a rate)."""
    return (float(np.percentile(samples, 2.5, method="lower")), float(np.percentile(samples, 97.5, method="higher")))


def bootstrap(base: Dict[int, List[float]], tract: Dict[int, List[float]], n_boot: int = 2000, seed: int = 0
              ) -> dict:
    """Speedup and TrAct - vanilla per budget, with 95% intervals from resampling the seeds of every arm and budget.

    ``base`` and ``tract`` map budget -> accuracies (one per seed). Returns {"budgets", "speedup", "speedup_ci",
    "bound" (the point estimate is a lower bound), "diff": {budget: (mean difference, low, high)}}.
    """
    budgets = sorted(set(base) & set(tract))
    means = lambda d: [float(np.mean(d[b])) for b in budgets]  # noqa: E731
    rng = np.random.default_rng(seed)
    boot_speed, boot_diff = [], []
    for _ in range(n_boot):
        b_means = [float(np.mean(rng.choice(base[b], len(base[b])))) for b in budgets]
        t_means = [float(np.mean(rng.choice(tract[b], len(tract[b])))) for b in budgets]
        boot_speed.append(speedup(budgets, b_means, t_means))
        boot_diff.append(np.subtract(t_means, b_means))
    boot_diff = np.array(boot_diff)
    _, bound = reach_budget(budgets, means(tract), means(base)[-1])
    return {
        "budgets": budgets,
        "speedup": speedup(budgets, means(base), means(tract)),
        "speedup_ci": interval(boot_speed),
        "bound": bound,
        "diff": {b: (float(np.mean(tract[b]) - np.mean(base[b])), *interval(boot_diff[:, i]))
                 for i, b in enumerate(budgets)},
    }


def format_speedup(value: float, budgets: Sequence[float], bound: bool = False) -> str:
    """A speedup as text: "not reached" (< 1) for 0, ">= x" at the cap (reached at the smallest budget)."""
    if value == 0:
        return "<1 (not reached)"
    cap = budgets[-1] / budgets[0]
    return f"{'>=' if bound or value >= cap else ''}{value:.2f}x"


# ---- the plan


def grid_choice(rows: List[dict], model: str, opt: str, budget: int) -> Optional[float]:
    """The baseline's best learning rate (mean over seeds) among the finished grid runs; None until all finished."""
    grid, seeds = OPTIMIZERS[opt][1], GRID_SEEDS
    acc = {lr: [r["acc1"] for r in rows if r["model"] == model and r["opt"] == opt and r["lam"] == 0
                and r["inputs"] == "standardised" and r["budget"] == budget and math.isclose(r["lr"], lr)
                and r["seed"] in seeds] for lr in grid}
    if any(len(a) < len(seeds) for a in acc.values()):
        return None
    return max(grid, key=lambda lr: np.mean(acc[lr]))


GRID_SEEDS = (0, 1)


def plan(cfg: argparse.Namespace, rows: List[dict]) -> List[Tuple[str, Run]]:
    """Every (study, run) of the protocol that can be planned with the results so far, in running order."""
    runs: List[Tuple[str, Run]] = []
    top = max(cfg.budgets)
    settings = [("vit", "adam", "main", cfg.seeds), ("vit", "sgd", "sgd", cfg.seeds[:cfg.other_seeds])]
    if cfg.resnet:
        settings += [("resnet", o, "resnet", cfg.seeds[:cfg.other_seeds]) for o in ("adam", "sgd")]
    for model, opt, study, seeds in settings:
        if study not in cfg.studies:
            continue
        lr = cfg.lr.get(opt)
        if lr is None:
            runs += [(f"grid-{study}", Run(model, opt, g, "standardised", 0.0, top, s))
                     for s in GRID_SEEDS for g in OPTIMIZERS[opt][1]]
            lr = grid_choice(rows, model, opt, top)
            if lr is None:
                continue
        for seed in seeds:  # seed-major: a cut-short study has every arm and budget for its first seeds
            runs += [(study, Run(model, opt, lr, "standardised", lam, b, seed))
                     for b in cfg.budgets for lam in (0.0, *cfg.lambdas)]
        if model == "vit" and opt == "adam":
            side = cfg.seeds[:cfg.other_seeds]
            if "ablation" in cfg.studies:
                runs += [("ablation", Run(model, opt, lr, inputs, lam, cfg.side_budget, s)) for s in side
                         for inputs in ("[0,1]", "[0,255]") for lam in (0.0, *cfg.lambdas)]
            if "lambda" in cfg.studies:
                runs += [("lambda", Run(model, opt, lr, "standardised", lam, cfg.side_budget, s)) for s in side
                         for lam in (0.0, *cfg.sweep)]
    return runs


def read_csv(path: Path, floats: Sequence[str] = (), ints: Sequence[str] = ()) -> List[dict]:
    """The rows of a benchmark's results CSV (none when it does not exist yet), the named columns as numbers."""
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update({k: float(r[k]) for k in floats})
        r.update({k: int(r[k]) for k in ints})
    return rows


def append_csv(path: Path, row: dict, fields: Sequence[str]) -> None:
    """Append one finished run to a results CSV as soon as it ends (the header first when the file is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def load_rows(path: Path) -> List[dict]:
    """The finished runs recorded in a results CSV."""
    return read_csv(path, ("lr", "lam", "acc1", "acc5", "wall_s", "images_per_sec"), ("budget", "seed"))


def row_key(r) -> str:
    """A result's run identity (what a rerun skips)."""
    return Run(r["model"], r["opt"], float(r["lr"]), r["inputs"], float(r["lam"]), int(r["budget"]),
               int(r["seed"])).name()


def execute(cfg: argparse.Namespace) -> List[dict]:
    """Run every planned run not yet in the CSV (replanning after each: the grid decides the later runs)."""
    csv_path = cfg.out_dir / "results.csv"
    rows = load_rows(csv_path)
    failed = set()
    while True:
        done = {row_key(r) for r in rows}
        todo = [(s, r) for s, r in plan(cfg, rows) if r.name() not in done and r.name() not in failed]
        if not todo:
            return rows
        study, run = todo[0]
        folder = cfg.out_dir / "runs" / run.name()
        log = read_log(folder)
        if len(log) < run.budget:  # not finished: an interrupted run starts over (minutes at most)
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            try:
                log = train(train_command(run, cfg.updates_per_epoch, cfg.in_chans, cfg.train_args, folder), folder,
                            cfg.threads)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                failed.add(run.name())
                continue
            wall = time.perf_counter() - start
        else:
            wall = sum(r["epoch_time"] for r in log)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # only log.txt and args.yaml are needed
        last = log[-1]
        row = {"study": study, **asdict(run), "acc1": last["test_acc1"], "acc5": last["test_acc5"],
               "wall_s": round(wall, 1), "images_per_sec": round(float(np.median([r["images_per_sec"] for r in log])),
                                                                   1),
               "updates_per_epoch": cfg.updates_per_epoch or "all"}
        append_csv(csv_path, row, FIELDS)
        rows = load_rows(csv_path)
        print(f"[{len(done) + 1}/{len(done) + len(todo)}] {study:9s} {run.name():48s} top-1 {last['test_acc1']:6.2f}%"
              f"  {wall:5.0f} s", flush=True)


# ---- report


def collect(rows: List[dict], **match) -> Dict[float, Dict[int, List[float]]]:
    """{lam: {budget: [acc1 per seed]}} of the convergence runs (not the sweep's or ablation's) matching ``match``."""
    out: Dict[float, Dict[int, List[float]]] = {}
    for r in rows:
        same = all((math.isclose(r[k], v) if isinstance(v, float) else r[k] == v) for k, v in match.items())
        if same and r["study"] not in ("lambda", "ablation"):
            out.setdefault(r["lam"], {}).setdefault(r["budget"], []).append(r["acc1"])
    return out


def settings_of(rows: List[dict]) -> List[Tuple[str, str, float]]:
    """The (model, opt, lr) settings with standardised-input convergence runs (grid runs at other rates excluded)."""
    found = []
    for r in rows:
        if r["study"] in ("main", "sgd", "resnet") and (r["model"], r["opt"], r["lr"]) not in found:
            found.append((r["model"], r["opt"], r["lr"]))
    return found


def side_rows(rows: List[dict], study: str) -> List[dict]:
    """The rows of the lambda sweep or the ablation figure: every run of its setting and budget, whichever study ran
    it first (the sweep's lambda 0.1 run is the main study's run at that budget)."""
    own = [r for r in rows if r["study"] == study]
    if not own:
        return []
    ref, seeds = own[0], {r["seed"] for r in own}  # the study's seeds: every point of the figure on the same ones
    part = [r for r in rows if (r["model"], r["opt"], r["budget"]) == (ref["model"], ref["opt"], ref["budget"])
            and math.isclose(r["lr"], ref["lr"]) and r["seed"] in seeds]
    if study == "lambda":
        return [r for r in part if r["inputs"] == "standardised"]
    lams = {r["lam"] for r in own}
    return [r for r in part if r["lam"] in lams]


def mean_std(accs: List[float]) -> str:
    """'mean +- std (n)' of a list of accuracies."""
    std = np.std(accs, ddof=1) if len(accs) > 1 else float("nan")
    return f"{np.mean(accs):.2f} ± {std:.2f} ({len(accs)})"


def report(rows: List[dict], n_boot: int = 2000) -> str:
    """The results as Markdown tables: accuracy per budget and arm, differences, speedups; grid, sweep, ablation."""
    lines: List[str] = []
    for model, opt, lr in settings_of(rows):
        data = collect(rows, model=model, opt=opt, lr=lr, inputs="standardised")
        base = data.get(0.0, {})
        budgets = sorted(base)
        lams = sorted(k for k in data if k)
        if not budgets:
            continue
        lines += [f"### {model}, {opt}, lr {lr:.4g}: test top-1 (%), mean ± std (seeds)", "",
                  "| arm | " + " | ".join(f"{b} ep" for b in budgets) + " | speedup [95% CI] |",
                  "|---|" + "---|" * len(budgets) + "---|"]
        lines.append("| vanilla | " + " | ".join(mean_std(base[b]) for b in budgets) + " | 1 |")
        diffs = []
        for lam in lams:
            tract = {b: v for b, v in data[lam].items() if b in base}
            cells = [mean_std(tract[b]) if b in tract else "" for b in budgets]
            if sorted(tract) == budgets and len(budgets) > 1:
                s = bootstrap(base, tract, n_boot=n_boot)
                lo, hi = s["speedup_ci"]
                speed = (f"{format_speedup(s['speedup'], budgets, s['bound'])} "
                         f"[{format_speedup(lo, budgets)}, {format_speedup(hi, budgets)}]")
                diffs.append((lam, s["diff"]))
            else:
                speed = "(budgets missing)"
            lines.append(f"| TrAct λ {lam:g} | " + " | ".join(cells) + f" | {speed} |")
        if diffs:
            lines += ["", "TrAct − vanilla (points) [95% bootstrap CI]:", "",
                      "| λ | " + " | ".join(f"{b} ep" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
            for lam, diff in diffs:
                lines.append(f"| {lam:g} | " + " | ".join(
                    f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, lo, hi in (diff[b] for b in budgets)) + " |")
        lines.append("")
    grid = [r for r in rows if r["study"].startswith("grid")]
    if grid:
        lines += ["### learning-rate grid (vanilla, largest budget)", "", "| model | opt | lr | top-1 (%) |",
                  "|---|---|---|---|"]
        for (model, opt, lr) in sorted({(r["model"], r["opt"], r["lr"]) for r in grid}):
            accs = [r["acc1"] for r in grid if (r["model"], r["opt"], r["lr"]) == (model, opt, lr)]
            lines.append(f"| {model} | {opt} | {lr:.4g} | {mean_std(accs)} |")
        lines.append("")
    for study, title in (("lambda", "λ sweep"), ("ablation", "inputs without standardisation")):
        part = side_rows(rows, study)
        if not part:
            continue
        budget = part[0]["budget"]
        lines += [f"### {title} (vit, adam, {budget} ep): test top-1 (%)", "", "| inputs | arm | top-1 |",
                  "|---|---|---|"]
        groups = sorted({(r["inputs"], r["lam"]) for r in part}, key=lambda k: (k[0] != "standardised", k))
        for inputs, lam in groups:
            accs = [r["acc1"] for r in part if (r["inputs"], r["lam"]) == (inputs, lam)]
            lines.append(f"| {inputs} | {'vanilla' if lam == 0 else f'TrAct λ {lam:g}'} | {mean_std(accs)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: List[dict], out_dir: Path) -> List[Path]:
    """The paper's figures: top-1 vs epoch budget (Fig. 3/4), vs lambda (Fig. 6), without standardisation (Fig. 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    settings = settings_of(rows)
    colors = {0.05: "tab:blue", 0.1: "tab:orange", 0.2: "tab:green"}
    if settings:
        fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
        for ax, (model, opt, lr) in zip(axes[0], settings):
            data = collect(rows, model=model, opt=opt, lr=lr, inputs="standardised")
            for i, lam in enumerate(sorted(data)):
                budgets = sorted(data[lam])
                dodge = 1 + 0.03 * (i - len(data) / 2)  # keeps the error bars apart on the log axis
                ax.errorbar([b * dodge for b in budgets], [np.mean(data[lam][b]) for b in budgets],
                            yerr=[np.std(data[lam][b], ddof=1) if len(data[lam][b]) > 1 else 0 for b in budgets],
                            fmt="o--" if lam == 0 else "o-", color="black" if lam == 0 else colors.get(lam),
                            capsize=3, label=f"{opt} | vanilla" if lam == 0 else f"{opt} | TrAct (λ={lam:g})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({b for d in data.values() for b in d}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            upe = {r["updates_per_epoch"] for r in rows if r["model"] == model and r["opt"] == opt}
            ax.set(xlabel=f"epoch budget, each its own run ({'/'.join(map(str, upe))} updates per epoch)",
                   ylabel="test top-1 (%)",
                   title=f"{model}, {opt}, lr {lr:.3g}")
            ax.legend()
        fig.tight_layout()
        written.append(out_dir / "convergence.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for study, name in (("lambda", "lambda.png"), ("ablation", "ablation.png")):
        part = side_rows(rows, study)
        if not part:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, inputs in enumerate(sorted({r["inputs"] for r in part}, key=lambda s: s != "standardised")):
            color = f"C{i}"
            sub = [r for r in part if r["inputs"] == inputs]
            lams = sorted({r["lam"] for r in sub if r["lam"]})
            accs = [[r["acc1"] for r in sub if r["lam"] == lam] for lam in lams]
            ax.errorbar(lams, [np.mean(a) for a in accs], yerr=[np.std(a, ddof=1) if len(a) > 1 else 0 for a in accs],
                        fmt="o-", color=color, capsize=3, label=f"TrAct {inputs}")
            base = [r["acc1"] for r in sub if r["lam"] == 0]
            if base:
                m, s = np.mean(base), (np.std(base, ddof=1) if len(base) > 1 else 0)
                ax.axhline(m, ls="--", color=color, label=f"vanilla {inputs}")
                ax.axhspan(m - s, m + s, color=color, alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["lam"] for r in part if r["lam"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set(xlabel="λ", ylabel="test top-1 (%)", title=f"vit, adam, {part[0]['budget']} epochs")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def get_args(argv=None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small version (~10 min on 2 cores): the table and plots")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="results.csv, results.md, plots, runs/ (default output/convergence[-quick])")
    p.add_argument("--studies", nargs="+", default=None,
                   choices=["main", "ablation", "sgd", "lambda", "resnet"], help="which studies to run")
    p.add_argument("--resnet", action="store_true", help="also run ResNet-18 (CIFAR stem): slow on CPUs")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="epoch budgets (full: 1 2 4)")
    p.add_argument("--side-budget", type=int, default=None, help="budget of the lambda sweep and ablation (full: 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the main study (full: 0 1 2 3 4)")
    p.add_argument("--other-seeds", type=int, default=None, help="how many of them the other studies use (full: 3)")
    p.add_argument("--lambdas", type=float, nargs="+", default=None, help="TrAct arms (full: 0.05 0.1 0.2)")
    p.add_argument("--sweep", type=float, nargs="+", default=None, help="lambda sweep values (full: 0.0125 ... 1.6)")
    p.add_argument("--lr", nargs="+", default=None, metavar="OPT=LR",
                   help="skip the grid: the learning rate of an optimizer, e.g. adam=0.001")
    p.add_argument("--updates-per-epoch", type=int, default=None, help="updates per epoch (full: 50; 0 = all)")
    p.add_argument("--in-chans", type=int, default=1, help="input channels (1: Fashion-MNIST as grayscale)")
    p.add_argument("--report-only", action="store_true", help="tables and plots from results.csv, no runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after it goes to every train.py run (e.g. --data-set CIFAR10 --data-path DIR)")
    cfg = p.parse_args(argv)
    preset = dict(budgets=[1, 2, 4], side_budget=2, seeds=[0, 1], other_seeds=2, sweep=[0.025, 0.1, 0.4],
                  updates_per_epoch=20, lambdas=[0.1], studies=["main", "ablation", "lambda"],
                  lr=["adam=0.001"]) if cfg.quick else dict(  # quick: no grid, the middle of its learning rates
        budgets=[1, 2, 4], side_budget=2, seeds=[0, 1, 2, 3, 4], other_seeds=3, sweep=list(SWEEP_LAMBDAS),
        updates_per_epoch=50, lambdas=list(LAMBDAS), studies=["main", "ablation", "sgd", "lambda", "resnet"], lr=[])
    for key, value in preset.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.lr = {k: float(v) for k, v in (item.split("=", 1) for item in cfg.lr)}
    cfg.budgets = sorted(cfg.budgets)
    cfg.updates_per_epoch = cfg.updates_per_epoch or None
    if "resnet" in cfg.studies and not cfg.resnet:
        cfg.studies.remove("resnet")
    cfg.out_dir = cfg.out_dir or ROOT / "output" / ("convergence-quick" if cfg.quick else "convergence")
    return cfg


def main(argv=None) -> None:
    cfg = get_args(argv)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"convergence benchmark: {cfg.out_dir} (rerun the same command to continue an interrupted run)", flush=True)
    rows = load_rows(cfg.out_dir / "results.csv") if cfg.report_only else execute(cfg)
    text = report(rows, n_boot=cfg.n_boot)
    (cfg.out_dir / "results.md").write_text(text + "\n")
    print(text)
    for path in plot(rows, cfg.out_dir):
        print(f"plot: {path}")
    print(f"table: {cfg.out_dir / 'results.md'}  CSV: {cfg.out_dir / 'results.csv'}")


if __name__ == "__main__":
    main()
