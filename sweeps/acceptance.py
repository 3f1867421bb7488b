"""Multi-run acceptance statistics for a speedrun record claim, as the record folders report them.

A claim is a set of runs of one config, each with a final val loss and a training time (seconds). It passes
when

- the mean final val loss is at or below the target and a one-sided one-sample t-test puts it below:
  `scipy.stats.ttest_1samp(losses, target, alternative="less").pvalue < alpha` (alpha 0.01), and
- the runs are faster than what they claim to beat, by the time test below, also at p < alpha.

The time test, by what the caller has:

- baseline runs (the previous record re-run on the same machines, as current record PRs do): Welch's t-test,
  one-sided that the candidate is faster, `ttest_ind(times, baseline_times, equal_var=False,
  alternative="less")`. The two-sided p is kept as well: that is the figure the record folders' statistics.md
  quote ("Welch p-value candidate time vs baseline time"); their t-statistic is baseline minus candidate
  (positive when faster), ours is candidate minus baseline (negative when faster).
- no baseline but the record's time: Welch's t-test against the record's summary statistics
  (`ttest_ind_from_stats`, one-sided) when its run-to-run spread and run count are known (count >= 2), else a
  one-sided one-sample t-test of the times against the record time.
- neither: no time test; acceptance rests on the loss alone, and `reasons` says so.

With baseline losses the losses are compared as well, by a two-sided Welch test, as the record folders do
("Welch p-value candidate loss vs baseline loss"); it is reported and never decides acceptance. Speedup is
reference mean time / candidate mean time (reference: the baseline's mean, else the record time), as in
the records' "speedup: 1.0131x" (80.7286 s / 79.6849 s for record #89).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

from scipy import stats

ALPHA = 0.01
TARGET = 3.28  # track 1 (8xH100, FineWeb)

# How the time was tested (AcceptanceTest.time_test)
TIME_VS_BASELINE = "welch_vs_baseline"
TIME_VS_RECORD_STATS = "welch_vs_record_stats"
TIME_VS_RECORD_TIME = "one_sample_vs_record_time"
TIME_NOT_TESTED = "none"


@dataclass(frozen=True)
class Runs:
    """Summary of one quantity over several runs; std is the sample std (ddof=1), 0 for a single run.

    All nan when a value is nan or infinite (a diverged run)."""

    n: int
    mean: float
    std: float
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Runs:
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("no runs to summarise")
        if not all(math.isfinite(x) for x in xs):  # a diverged run: no meaningful summary
            nan = math.nan
            return cls(n=len(xs), mean=nan, std=nan, median=nan, min=nan, max=nan)
        return cls(n=len(xs), mean=statistics.fmean(xs), std=statistics.stdev(xs) if len(xs) > 1 else 0.0,
                   median=float(statistics.median(xs)), min=min(xs), max=max(xs))


def loss_p_value(losses: Sequence[float], target: float) -> float:
    """One-sided one-sample t-test p that the mean loss is below the target; nan for fewer than 2 runs."""
    if len(losses) < 2:
        return math.nan
    return float(stats.ttest_1samp(losses, target, alternative="less").pvalue)


def runs_needed(mean: float, std: float, target: float, alpha: float = ALPHA) -> int | None:
    """Smallest n at which a sample with this mean and sample std would pass the one-sided t-test (p < alpha).

    None when mean >= target (no number of runs helps), 2 when std == 0 (the t-test needs two runs).
    """
    if any(math.isnan(x) for x in (mean, std, target)) or std < 0:
        raise ValueError(f"runs_needed: mean, std and target must be numbers and std >= 0 (got {mean}, {std})")
    if mean >= target:
        return None
    if std == 0:
        return 2

    def passes(n: int) -> bool:
        t = (mean - target) / (std / math.sqrt(n))
        return stats.t.cdf(t, n - 1) < alpha

    # p falls as n grows (t grows like sqrt(n), the t distribution narrows): double, then bisect
    hi = 2
    while not passes(hi):
        hi *= 2
    lo = hi // 2  # fails (or is 1, below the minimum of 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 2 and passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def _p(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if x < 1e-4:
        return f"{x:.1e}"
    return f"{x:.2g}" if x < 0.95 else f"{x:.3g}"


@dataclass(frozen=True)
class AcceptanceTest:
    """The statistics of one claim; build it with `acceptance_test`."""

    target: float
    alpha: float
    losses: tuple[float, ...]
    times: tuple[float, ...]  # seconds
    loss: Runs
    time: Runs
    loss_p: float  # one-sided one-sample t-test vs target; nan for n < 2
    runs_needed: int | None  # runs the observed loss spread would need for p < alpha (None if mean >= target)
    time_test: str  # TIME_VS_BASELINE, TIME_VS_RECORD_STATS, TIME_VS_RECORD_TIME or TIME_NOT_TESTED
    time_t: float | None  # t-statistic of the time test, candidate minus reference (negative: faster)
    time_p: float | None  # one-sided p that the candidate is faster (decides acceptance)
    time_p_two_sided: float | None
    reference_time_s: float | None  # the baseline's mean time, else the record time
    speedup: float | None  # reference_time_s / candidate mean time
    time_saved_s: float | None  # reference_time_s - candidate mean time
    baseline_losses: tuple[float, ...] | None
    baseline_times: tuple[float, ...] | None
    baseline_loss: Runs | None
    baseline_time: Runs | None
    baseline_loss_p: float | None  # the baseline's own one-sided p vs target
    loss_welch_p: float | None  # two-sided Welch test, candidate loss vs baseline loss (reported only)
    slowest_run_s: float  # the candidate's slowest run
    fastest_baseline_s: float | None  # the baseline's fastest run
    record_time_s: float | None
    time_noise: float | None  # the record's run-to-run time std (seconds)
    record_runs: int | None
    accepted: bool
    reasons: tuple[str, ...]  # one line per failed condition (and a note when time was not tested)

    def to_dict(self) -> dict:
        """JSON-friendly: nested summaries as dicts, tuples as lists, nan as None."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Runs):
                v = {k.name: _nan_to_none(getattr(v, k.name)) for k in fields(v)}
            elif isinstance(v, tuple):
                v = [_nan_to_none(x) for x in v]
            else:
                v = _nan_to_none(v)
            out[f.name] = v
        return out

    def _time_test_words(self) -> str:
        if self.time_test == TIME_VS_BASELINE:
            return f"Welch vs the baseline's {self.baseline_time.n} runs"
        if self.time_test == TIME_VS_RECORD_STATS:
            return (f"Welch vs the record ({self.record_time_s:.3f} s ± {self.time_noise:.3f} s, "
                    f"{self.record_runs} runs)")
        if self.time_test == TIME_VS_RECORD_TIME:
            return f"one-sample t-test vs the record time {self.record_time_s:.3f} s"
        return "not tested"

    def table(self) -> str:
        """A short fixed-width text table for the terminal, then the tests, the verdict and the reasons."""
        rows = [("val loss", self.loss, 4), ("train time s", self.time, 3)]
        if self.baseline_loss is not None:
            rows.append(("baseline val loss", self.baseline_loss, 4))
        if self.baseline_time is not None:
            rows.append(("baseline time s", self.baseline_time, 3))
        head = ("", "runs", "mean", "std", "median", "min", "max")
        cells = [head] + [(name, str(r.n), f"{r.mean:.{d + 1}f}", f"{r.std:.{d + 1}f}", f"{r.median:.{d}f}",
                           f"{r.min:.{d}f}", f"{r.max:.{d}f}") for name, r, d in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
                 for cell in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"loss: one-sided t-test p = {_p(self.loss_p)} that the mean is below {self.target:g}"
                     f" (alpha {self.alpha:g})")
        if self.loss_welch_p is not None:
            lines.append(f"loss vs baseline: Welch two-sided p = {_p(self.loss_welch_p)}")
        if self.time_test != TIME_NOT_TESTED:
            lines.append(f"time: {self._time_test_words()}: one-sided p = {_p(self.time_p)}, "
                         f"t = {self.time_t:.3f}; speedup {self.speedup:.4f}x, saves {self.time_saved_s:.3f} s")
        if self.fastest_baseline_s is not None:
            lines.append(f"slowest run {self.slowest_run_s:.3f} s, "
                         f"fastest baseline run {self.fastest_baseline_s:.3f} s")
        lines.append("verdict: " + ("ACCEPTED" if self.accepted else "NOT ACCEPTED"))
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)

    def statistics_md(self, title: str, runs_table_rows: Sequence[dict] | None = None) -> str:
        """Markdown in the layout of a record folder's statistics.md, plus an optional per-run table.

        `runs_table_rows`: dicts with keys `run`, `val_loss`, `train_time_s`, `verdict` (a word of the caller's).
        """
        t = self.target
        out = [f"# {title}", "", "## Summary", "",
               f"- runs: `{self.loss.n}`",
               f"- target val loss: `{t:g}`, alpha `{self.alpha:g}`",
               f"- verdict: **{'accepted' if self.accepted else 'not accepted'}**", ""]
        out += ["## Statistics", "", "| quantity | value |", "| --- | ---: |",
                f"| mean final val loss | {self.loss.mean:.10f} |",
                f"| val loss std (sample) | {self.loss.std:.10f} |",
                f"| p, one-sided t-test of mean < {t:g} | {_fmt_p(self.loss_p)} |",
                f"| mean train time | {self.time.mean:.6f} s |",
                f"| train time std (sample) | {self.time.std:.6f} s |",
                f"| median train time | {self.time.median:.3f} s |",
                f"| train time min-max | {self.time.min:.3f}-{self.time.max:.3f} s |", ""]
        if runs_table_rows:
            out += ["## Runs", "", "| run | val loss | train time | verdict |", "| --- | ---: | ---: | --- |"]
            for row in runs_table_rows:
                out.append("| " + " | ".join([_md_cell(row.get("run", "")), _md_num(row.get("val_loss"), "{:.4f}"),
                                              _md_num(row.get("train_time_s"), "{:.3f} s"),
                                              _md_cell(row.get("verdict", ""))]) + " |")
            out.append("")
        out += ["Final val losses:", "", "```python", _py_list(self.losses, 4), "```", "",
                "Train times (s):", "", "```python", _py_list(self.times, 3), "```", ""]
        out += self._md_comparison()
        out += ["## Verdict", "", "Accepted." if self.accepted else "Not accepted.", ""]
        out += [f"- {r}" for r in self.reasons]
        return "\n".join(out).rstrip() + "\n"

    def _md_record_line(self) -> str:
        line = f"- record time: `{self.record_time_s:.6f} s`"
        if self.time_test == TIME_VS_RECORD_STATS:
            line += f" (std `{self.time_noise:.6f} s` over `{self.record_runs}` runs)"
        return line

    def _md_comparison(self) -> list[str]:
        if self.baseline_loss is None and self.baseline_time is None and self.time_test == TIME_NOT_TESTED:
            return []
        out = []
        if self.baseline_loss is not None or self.baseline_time is not None:
            out += ["## Against the baseline", "", "Baseline:", ""]
            if self.baseline_loss is not None:
                out += [f"- runs: `{self.baseline_loss.n}`",
                        f"- mean final val loss: `{self.baseline_loss.mean:.10f}`",
                        f"- p, one-sided t-test of mean < `{self.target:g}`: `{_fmt_p(self.baseline_loss_p)}`"]
            if self.baseline_time is not None:
                out.append(f"- mean train time: `{self.baseline_time.mean:.6f} s`")
            if self.time_test in (TIME_VS_RECORD_STATS, TIME_VS_RECORD_TIME):
                out.append(self._md_record_line())
            out += ["", "These runs:", "",
                    f"- mean final val loss: `{self.loss.mean:.10f}`",
                    f"- p, one-sided t-test of mean < `{self.target:g}`: `{_fmt_p(self.loss_p)}`",
                    f"- mean train time: `{self.time.mean:.6f} s`", ""]
        else:
            out += ["## Against the record", "", self._md_record_line(), ""]
        out += ["Differences:", ""]
        if self.reference_time_s is not None:
            rel = -self.time_saved_s / self.reference_time_s * 100
            out += [f"- train time: `{-self.time_saved_s:+.6f} s`",
                    f"- train time, relative: `{rel:+.6f}%`",
                    f"- speedup (reference mean / these runs' mean): `{self.speedup:.8f}x`"]
        if self.baseline_loss is not None:
            out.append(f"- val loss: `{self.loss.mean - self.baseline_loss.mean:+.10f}`")
        out += ["", "Tests:", ""]
        if self.loss_welch_p is not None:
            out.append(f"- val loss vs baseline, Welch two-sided p: `{_fmt_p(self.loss_welch_p)}`")
        if self.time_test != TIME_NOT_TESTED:
            out += [f"- train time, {self._time_test_words()}: t (these runs minus reference) `{self.time_t:.3f}`",
                    f"- train time, one-sided p (these runs faster): `{_fmt_p(self.time_p)}`",
                    f"- train time, two-sided p: `{_fmt_p(self.time_p_two_sided)}`"]
        if self.fastest_baseline_s is not None:
            out += [f"- slowest of these runs: `{self.slowest_run_s:.3f} s`",
                    f"- fastest baseline run: `{self.fastest_baseline_s:.3f} s`"]
        return out + [""]


def _fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.10f}" if p >= 1e-6 else f"{p:.2g}"


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_num(v, fmt: str) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt.format(v)
    return _md_cell("" if v is None else v)


def _py_list(xs: Sequence[float], decimals: int) -> str:
    return "[" + ", ".join(f"{x:.{decimals}f}" for x in xs) + "]"


def _floats(name: str, xs: Iterable[float] | None) -> tuple[float, ...] | None:
    if xs is None:
        return None
    out = tuple(float(x) for x in xs)
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def acceptance_test(losses: Sequence[float], times: Sequence[float], target: float = TARGET, *,
                    baseline_losses: Sequence[float] | None = None, baseline_times: Sequence[float] | None = None,
                    record_time_s: float | None = None, time_noise: float | None = None,
                    record_runs: int | None = None, alpha: float = ALPHA) -> AcceptanceTest:
    """The acceptance statistics of a set of runs (one final val loss and training time in seconds per run).

    The time is tested against `baseline_times` when given (Welch), else against `record_time_s` (Welch from
    the record's summary when `time_noise` and `record_runs` >= 2 are given, else one-sample), else not at all.
    """
    losses, times = _floats("losses", losses), _floats("times", times)
    baseline_losses = _floats("baseline_losses", baseline_losses)
    baseline_times = _floats("baseline_times", baseline_times)
    if losses is None or times is None or len(losses) != len(times):
        raise ValueError(f"losses and times must hold one value per run "
                         f"(got {len(losses or ())} and {len(times or ())})")
    if baseline_losses is not None and baseline_times is not None and len(baseline_losses) != len(baseline_times):
        raise ValueError(f"baseline_losses and baseline_times differ in length "
                         f"({len(baseline_losses)} and {len(baseline_times)})")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    loss, time = Runs.of(losses), Runs.of(times)
    loss_p = loss_p_value(losses, target)
    needed = runs_needed(loss.mean, loss.std, target, alpha) if math.isfinite(loss.mean) else None

    base_loss = Runs.of(baseline_losses) if baseline_losses is not None else None
    base_time = Runs.of(baseline_times) if baseline_times is not None else None
    base_loss_p = loss_p_value(baseline_losses, target) if baseline_losses is not None else None
    loss_welch_p = None
    if baseline_losses is not None:
        loss_welch_p = (float(stats.ttest_ind(losses, baseline_losses, equal_var=False).pvalue)
                        if len(losses) >= 2 and len(baseline_losses) >= 2 else math.nan)

    time_test, time_t, time_p, time_p2, reference = _time_test(times, time, baseline_times, base_time,
                                                               record_time_s, time_noise, record_runs)
    speedup = reference / time.mean if reference is not None else None
    saved = reference - time.mean if reference is not None else None

    mean_ok, loss_p_ok = loss.mean <= target, loss_p < alpha  # False for nan
    time_ok = time_test == TIME_NOT_TESTED or time_p < alpha
    reasons = _reasons(losses, loss, loss_p, needed, target, alpha, time, time_test, time_p, reference,
                       base_time, record_runs)
    return AcceptanceTest(
        target=float(target), alpha=float(alpha), losses=losses, times=times, loss=loss, time=time,
        loss_p=loss_p, runs_needed=needed, time_test=time_test, time_t=time_t, time_p=time_p,
        time_p_two_sided=time_p2, reference_time_s=reference, speedup=speedup, time_saved_s=saved,
        baseline_losses=baseline_losses, baseline_times=baseline_times, baseline_loss=base_loss,
        baseline_time=base_time, baseline_loss_p=base_loss_p, loss_welch_p=loss_welch_p,
        slowest_run_s=time.max, fastest_baseline_s=base_time.min if base_time is not None else None,
        record_time_s=None if record_time_s is None else float(record_time_s),
        time_noise=None if time_noise is None else float(time_noise), record_runs=record_runs,
        accepted=bool(mean_ok and loss_p_ok and time_ok), reasons=reasons)


def _time_test(times, time: "Runs", baseline_times, base_time, record_time_s, time_noise, record_runs):
    """(which test, t, one-sided p, two-sided p, reference mean time) for the time side of the claim."""
    if baseline_times is not None:
        if len(times) < 2 or len(baseline_times) < 2:
            return TIME_VS_BASELINE, math.nan, math.nan, math.nan, base_time.mean
        res = stats.ttest_ind(times, baseline_times, equal_var=False, alternative="less")
        two = stats.ttest_ind(times, baseline_times, equal_var=False).pvalue
        return TIME_VS_BASELINE, float(res.statistic), float(res.pvalue), float(two), base_time.mean
    if record_time_s is None:
        return TIME_NOT_TESTED, None, None, None, None
    reference = float(record_time_s)
    if time_noise is not None and record_runs is not None and record_runs >= 2:
        if time.n < 2:
            return TIME_VS_RECORD_STATS, math.nan, math.nan, math.nan, reference
        args = (time.mean, time.std, time.n, reference, float(time_noise), int(record_runs))
        res = stats.ttest_ind_from_stats(*args, equal_var=False, alternative="less")
        two = stats.ttest_ind_from_stats(*args, equal_var=False).pvalue
        return TIME_VS_RECORD_STATS, float(res.statistic), float(res.pvalue), float(two), reference
    if time.n < 2:
        return TIME_VS_RECORD_TIME, math.nan, math.nan, math.nan, reference
    res = stats.ttest_1samp(times, reference, alternative="less")
    return (TIME_VS_RECORD_TIME, float(res.statistic), float(res.pvalue),
            float(stats.ttest_1samp(times, reference).pvalue), reference)


def _reasons(losses, loss: "Runs", loss_p, needed, target, alpha, time: "Runs", time_test, time_p, reference,
             base_time, record_runs) -> tuple[str, ...]:
    """One line for every condition of the claim that failed."""
    reasons = []
    mean_ok, loss_p_ok = loss.mean <= target, loss_p < alpha  # False for nan
    bad = sum(not math.isfinite(x) for x in losses)
    if bad:
        reasons.append(f"{bad} of {loss.n} runs ended with a non-finite val loss (diverged): the claim cannot pass")
    elif not mean_ok:
        reasons.append(f"mean val loss {loss.mean:.4f} is above the target {target:g}: more runs will not fix that")
    if not loss_p_ok and not bad:
        if loss.n < 2:
            reasons.append("loss p is undefined with 1 run: the t-test needs at least 2")
        else:
            reasons.append(f"loss p = {_p(loss_p)} is not below {alpha:g}")
        if mean_ok and loss.n >= 2 and needed is not None:
            reasons.append(f"with this spread (std {loss.std:.2g}) about {needed} runs would give p < {alpha:g}")
    if time_test == TIME_NOT_TESTED:
        reasons.append("no baseline runs or record time given: the time is not tested, acceptance rests on the "
                       "loss alone")
    elif math.isnan(time_p):
        kind = "one-sample" if time_test == TIME_VS_RECORD_TIME else "Welch"
        sides = " on each side" if time_test != TIME_VS_RECORD_TIME else ""
        reasons.append(f"time: the {kind} t-test needs at least 2 runs{sides}")
    elif not time_p < alpha:
        kind = "one-sample" if time_test == TIME_VS_RECORD_TIME else "Welch"
        against, ref = {TIME_VS_BASELINE: (f"vs the baseline's {base_time.n if base_time else 0} runs", "baseline"),
                        TIME_VS_RECORD_STATS: (f"vs the record's {record_runs} runs", "record"),
                        }.get(time_test, ("vs the record time", "record"))
        reasons.append(f"time: {kind} p = {_p(time_p)} {against} is not below {alpha:g} "
                       f"(mean {time.mean:.3f} s vs {ref} {reference:.3f} s)")
    return tuple(reasons)
