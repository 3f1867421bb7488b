"""The speedrun's acceptance test over several runs of one config, and how many runs a miss would need.

Accepted when the mean final val loss is <= the target with a one-sided one-sample t-test p < 0.01
(`scipy.stats.ttest_1samp(losses, target, alternative="less")`) and the mean training time beats the record.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.01


@dataclass(frozen=True)
class Verdict:
    runs: int
    loss_mean: float
    loss_std: float
    time_mean: float
    time_std: float
    p_value: float
    target: float
    record_time_s: float
    accepted: bool
    runs_needed: int | None  # for a miss on p alone: runs the observed spread would need; None if hopeless
    reasons: tuple[str, ...]

    def table(self) -> str:
        head = ["runs", "train time mean ± std", "val loss mean ± std", "p-value", "verdict"]
        row = [str(self.runs), f"{self.time_mean:.2f} ± {self.time_std:.2f} s",
               f"{self.loss_mean:.4f} ± {self.loss_std:.4f}", f"{self.p_value:.3g}",
               "ACCEPTED" if self.accepted else "not accepted"]
        widths = [max(len(h), len(c)) for h, c in zip(head, row)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(row)]
        out += [f"- {r}" for r in self.reasons]
        return "\n".join(out)


def p_value(losses: list[float], target: float) -> float:
    if len(losses) < 2:
        return math.nan
    return float(stats.ttest_1samp(losses, target, alternative="less").pvalue)


def runs_needed(mean: float, std: float, target: float, alpha: float = ALPHA, limit: int = 100_000) -> int | None:
    """Smallest n at which a sample with this mean and spread would pass the one-sided t-test."""
    if mean >= target:
        return None
    if std == 0:
        return 2
    for n in range(2, limit):
        if (target - mean) / (std / math.sqrt(n)) > stats.t.ppf(1 - alpha, n - 1):
            return n
    return None


def judge_runs(losses: list[float], times: list[float], target: float, record_time_s: float) -> Verdict:
    n = len(losses)
    mean = statistics.fmean(losses) if losses else math.nan
    std = statistics.stdev(losses) if n > 1 else 0.0
    t_mean = statistics.fmean(times) if times else math.nan
    t_std = statistics.stdev(times) if n > 1 else 0.0
    p = p_value(losses, target)
    reasons = []
    if not mean <= target:
        reasons.append(f"mean val loss {mean:.4f} is above the target {target}: more runs will not fix that")
    if not p < ALPHA:
        reasons.append(f"p = {p:.3g} is not below {ALPHA}")
    if not t_mean < record_time_s:
        reasons.append(f"mean training time {t_mean:.2f}s does not beat the record {record_time_s:g}s")
    needed = runs_needed(mean, std, target)
    if reasons and needed is not None and needed > n and not p < ALPHA:
        reasons.append(f"with this spread (std {std:.4f}) about {needed} runs would give p < {ALPHA}")
    return Verdict(n, mean, std, t_mean, t_std, p, target, record_time_s, not reasons, needed, tuple(reasons))
