"""The statistics of the benchmarks: paired t-intervals, exact sign-flip tests, Holm's correction and the speed-up
read off accuracy-against-budget curves. numpy and scipy only, so each function can be checked on constructed data.

What an interval here means: a paired t-interval assumes the per-seed differences are a sample from a normal
distribution; with n seeds it has n - 1 degrees of freedom, and its 95% is the coverage under that assumption (at
n = 3 the interval is wide, which is its honesty). The sign-flip p-value assumes only that, with no effect, each
seed's difference was as likely negative as positive: it is exact for any n, and with n seeds it cannot go below
2 / 2^n (0.25 at n = 3, 0.0078 at n = 8).
"""
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of ``values`` (n - 1 degrees of freedom); a point when n < 2."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def t_pvalue(values: Sequence[float]) -> float:
    """The two-sided one-sample t-test p-value of mean 0 (1.0 for fewer than 2 values or no spread and mean 0)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return 1.0
    sd = x.std(ddof=1)
    if sd == 0:
        return 1.0 if x.mean() == 0 else 0.0
    t = x.mean() / (sd / math.sqrt(len(x)))
    return float(2 * scipy_stats.t.sf(abs(t), len(x) - 1))


def sign_flip_pvalue(values: Sequence[float]) -> float:
    """The exact two-sided sign-flip (paired permutation) p-value of mean 0: all 2^n sign patterns enumerated."""
    x = np.abs(np.asarray(values, dtype=float))
    observed = abs(float(np.sum(values)))
    flips = np.array(list(itertools.product((-1.0, 1.0), repeat=len(x))))
    sums = np.abs(flips @ x)
    return float(np.mean(sums >= observed - 1e-12 * max(1.0, observed)))


def anova_pvalue(groups: Sequence[Sequence[float]]) -> float:
    """The one-way ANOVA p-value of "the groups' means differ" (scipy's f_oneway)."""
    return float(scipy_stats.f_oneway(*[np.asarray(g, dtype=float) for g in groups]).pvalue)


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired(vanilla: Dict[int, float], tract: Dict[int, float]) -> Optional[dict]:
    """TrAct - vanilla paired by seed: the differences, their mean, 95% t-interval, t and exact sign-flip p-values,
    seeds ahead and each arm's mean; None without common seeds."""
    seeds = sorted(set(vanilla) & set(tract))
    if not seeds:
        return None
    d = [tract[s] - vanilla[s] for s in seeds]
    mean, low, high = t_interval(d)
    return {"n": len(d), "diffs": d, "diff": mean, "low": low, "high": high, "p_t": t_pvalue(d),
            "p_flip": sign_flip_pvalue(d),
            "ahead": int(sum(x > 0 for x in d)), "vanilla": float(np.mean([vanilla[s] for s in seeds])),
            "tract": float(np.mean([tract[s] for s in seeds]))}


def reach_budget(budgets: Sequence[float], means: Sequence[float], target: float) -> Tuple[Optional[float], bool]:
    """(E*, bound): the smallest budget where the curve reaches ``target``, interpolated linearly in log budget.

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
    """budget_max / E*, E* where TrAct's curve reaches the baseline's value at budget_max; 0 when never reached."""
    e_star, _ = reach_budget(budgets, tract_means, base_means[-1])
    return budgets[-1] / e_star if e_star else 0.0


def log_budget_area(budgets: Sequence[float], accs: Sequence[float]) -> float:
    """The mean accuracy over log budget: the trapezoid area under the curve against log(budget), over its width."""
    x = np.log(np.asarray(budgets, dtype=float))
    y = np.asarray(accs, dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def bootstrap_speedup(budgets: Sequence[float], base: np.ndarray, tract: np.ndarray, n_boot: int = 10000,
                      seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """The percentile interval of the speed-up over a paired bootstrap of seeds.

    ``base`` and ``tract`` are (seeds, budgets) arrays whose rows are the same seeds: each resample draws seeds with
    replacement and keeps both arms and every budget of a drawn seed together. A resample where TrAct never reaches
    the target is a speed-up of 0 ("below 1"), ordered below every reached value; the ends are sample values (no
    interpolation between a 0 and a rate).
    """
    base, tract = np.asarray(base, dtype=float), np.asarray(tract, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base), size=(n_boot, len(base)))
    values = [speedup(budgets, base[p].mean(axis=0), tract[p].mean(axis=0)) for p in picks]
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(values, tail, method="lower")),
            float(np.percentile(values, 100 - tail, method="higher")))
