"""Sweep results: one row per trial (config + final metrics) from Tune's ResultGrid, to parquet and a table."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from .protocol import TrialStatus, FINISHED, REPLAYED, index_from_dirname, trial_index, trial_status

METRIC_COLUMNS = ("val_loss", "final_val_loss", "train_time_s", "time_to_target_s", "objective_time_s", "tokens", "step",
                  "startup_s", "trial_startup_s", "compile_s", "val_time_s", "peak_mem_bytes", "floor", "time_total_s",
                  "compile_graphs", "compile_fx_cache_hits", "compile_fx_cache_misses", "compile_artifacts_loaded",
                  "first_report_s", "worker_start_s", "init_s", "compile_artifacts_load_s", "host_pid",
                  "host_trials_before")
NODE_COLUMNS = ("node_id", "node_ip")
# reported once (at the first report) or cumulatively (at validations): a trial stopped early has them only
# in an earlier report than its last
EARLIER_REPORT_COLUMNS = ("trial_startup_s", "startup_s", "compile_s", "val_time_s", "compile_graphs",
                          "compile_fx_cache_hits", "compile_fx_cache_misses", "compile_artifacts_loaded",
                          "worker_start_s", "init_s", "compile_artifacts_load_s", "host_pid", "host_trials_before")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(text: str, limit: int = 300) -> str:
    """The line of a Ray error that says what happened (its last), without colour codes."""
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:limit]


def error_file_line(path: str | None, limit: int) -> str | None:
    """The last line of a trial's error.txt (error_summary), or None where this machine does not have the file."""
    if not path or not Path(path).is_file():
        return None
    return error_summary(Path(path).read_text(errors="replace"), limit)


def error_line(res) -> str:
    """A failed trial's error: its error.txt's line where this machine has it (a reason the driver added ends it),
    else Tune's error's."""
    return error_file_line(str(Path(res.path) / "error.txt"), 300) or error_summary(str(res.error))


def rows_from_grid(grid, param_keys: list[str]) -> list[dict]:
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or Path(res.path).name.split("_")[-1]
        index = index_from_dirname(res.path)
        df = res.metrics_dataframe
        if df is not None and "trial_startup_s" in df and "time_total_s" in df:
            first = df[df["trial_startup_s"].notna()]
            if len(first):  # Tune's clock at the first report: the trial's start-up as the slot held it
                m["first_report_s"] = float(first["time_total_s"].iloc[-1])
        for k in EARLIER_REPORT_COLUMNS:
            if k not in m and df is not None and k in df:
                vals = df[k].dropna()
                if len(vals):
                    m[k] = float(vals.iloc[-1])
        row = {"trial_index": index, "trial_id": trial_id,
               "status": str(trial_status(m, res.error)), "error": error_line(res) if res.error else None}
        for k in param_keys:  # a trial interrupted right at its start has no config on disk yet
            row[k] = (res.config or {}).get(k)
        for k in METRIC_COLUMNS:
            v = m.get(k)
            row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        for k in NODE_COLUMNS:  # where the trial ran (its rank 0's Ray node), from its first report on
            v = m.get(k) if m.get(k) else (df[k].dropna().iloc[-1] if df is not None and k in df and
                                           len(df[k].dropna()) else None)
            row[k] = str(v) if v else None
        # Tune's own: the process that ran the trainable (under --reuse-workers, one relay per slot for the sweep)
        row["trainable_pid"] = m.get("pid")
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_index"])


def write_parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def ranked(rows: list[dict], metric: str = "val_loss", mode: str = "min") -> list[dict]:
    def key(r):
        v = r.get(metric)
        bad = v is None or (isinstance(v, float) and math.isnan(v)) or r["status"] != TrialStatus.FINISHED
        return (bad, 0.0 if v is None or math.isnan(v) else v if mode == "min" else -v)
    return sorted(rows, key=key)


def pareto_front(rows: list[dict], x: str = "val_loss", y: str = "train_time_s") -> list[dict]:
    """Finished trials that no other finished trial beats in both x and y (both minimised), by x."""
    ok = [r for r in rows if r["status"] == TrialStatus.FINISHED and r.get(x) is not None and r.get(y) is not None]
    front = [r for r in ok if not any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in ok)]
    return sorted(front, key=lambda r: r[x])


@dataclass(frozen=True)
class TimeSplit:
    """Where a sweep's device time went: slots (GPUs, or CPU workers without GPUs) x wall time, split into
    what the trials measured themselves (timed training, compilation, validation, other start-up: Ray,
    process, data, model), idle (no trial holding the slot: waiting for placement, Ray start-up and
    teardown between trials) and `other`: held time that no trial clock explains (should be near zero)."""
    slots: int
    wall_s: float
    training: float
    compiling: float
    validating: float
    starting: float
    idle: float
    other: float

    @property
    def total(self) -> float:
        return self.slots * self.wall_s

    def parts(self) -> dict[str, float]:
        return {"training": self.training, "compiling": self.compiling, "validating": self.validating,
                "starting": self.starting, "idle": self.idle, "other": self.other}

    def format(self, unit: str) -> str:
        lines = [f"{unit} time: {self.slots} x {self.wall_s:.0f}s wall = {self.total:.0f} {unit}-s",
                 f"  {'':12}{unit + '-s':>10}  {'share':>6}"]
        for name, v in self.parts().items():
            lines.append(f"  {name:12}{v:>10.0f}  {100 * v / self.total if self.total else 0:>5.1f}%")
        return "\n".join(lines)


def time_split(rows: list[dict], wall_s: float, slots: int, workers: int) -> TimeSplit:
    """Each trial holds `workers` slots for Tune's time_total_s (trainable start to its last report): start-up
    is Tune's clock at the first report (the first timed step; compilation inside it, by the trainer's clock),
    and after it the trainer's clocks count timed training and validation. Sums over trials, times workers."""
    get = lambda r, k: r.get(k) or 0.0  # noqa: E731
    held = sum(get(r, "time_total_s") for r in rows)
    training = sum(get(r, "train_time_s") for r in rows)
    compiling = sum(get(r, "compile_s") for r in rows)
    validating = sum(get(r, "val_time_s") for r in rows)
    starting = sum(max(0.0, (r.get("first_report_s") or get(r, "trial_startup_s")) - get(r, "compile_s"))
                   for r in rows)
    other = held - training - compiling - validating - starting
    w = workers
    # clocks of different processes disagree by fractions of a second: a share is never shown below zero
    return TimeSplit(slots, wall_s, training * w, compiling * w, validating * w, starting * w,
                     max(0.0, slots * wall_s - held * w), max(0.0, other * w))


def format_table(rows: list[dict], param_keys: list[str], top: int = 10) -> str:
    def fmt(v, nd=4):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.{nd}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
        return str(v)

    # "optim.muon_lr" -> "muon_lr"; a script's knobs keep their names where the last part repeats (Muon.lr, DistAdam.lr)
    last = [k.split(".", 1)[-1] for k in param_keys]
    short = [s if last.count(s) == 1 else k for s, k in zip(last, param_keys)]
    header = ["rank", "trial", "status", *short, "val_loss", "vs_best", "train_s", "objective_s", "verdict",
              "trial_startup_s", "compile_s", "val_s"]  # each column named by the one metric it shows
    body = []
    for i, r in enumerate(rows[:top], 1):
        body.append([str(i), str(r["trial_index"]) + ("*" if r["trial_index"] == 0 else ""), r["status"],
                     *[fmt(r.get(k)) for k in param_keys], fmt(r.get("val_loss")), r.get("vs_best") or "-",
                     fmt(r.get("train_time_s"), 3),
                     fmt(r.get("objective_time_s"), 3), r.get("verdict") or "-",
                     fmt(r.get("trial_startup_s"), 3), fmt(r.get("compile_s"), 3), fmt(r.get("val_time_s"), 3)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


class ProgressPrinter(tune.Callback):
    """One line per validation and per finished trial, instead of Tune's full status tables."""

    def __init__(self, total_steps: int, metric: str, out=None, trials: int | None = None):
        # not print itself: this callback is pickled with the experiment, and Ray may swap builtins.print
        self.total, self.metric, self._out, self.trials = total_steps, metric, out, trials
        self.t0 = time.time()
        self.best = None

    def setup(self, **info):  # also after a restore, which brings back the pickled t0
        self.t0 = time.time()

    def out(self, line: str) -> None:
        (self._out or print)(line)

    def _stamp(self) -> str:
        return f"[{time.time() - self.t0:6.0f}s]"

    def on_trial_start(self, iteration, trials, trial, **info):
        self.out(f"{self._stamp()} trial {trial_index(trial)} started: "
                 + ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items()))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result and not result.get(FINISHED):
            self.out(f"{self._stamp()} trial {trial_index(trial)} step {result.get('step')}/{self.total} "
                     f"{self.metric} {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if r.get(REPLAYED):
            self.out(f"{self._stamp()} trial {trial_index(trial)} had ended before the interruption: kept as it was")
        elif r.get(FINISHED):
            v = r.get(self.metric)
            if r.get("status") == TrialStatus.DIVERGED:  # its metric is its step-0 loss (trial.final_metrics)
                what = (f"diverged at step {r.get('step')} (a non-finite loss; {self.metric} {v:.4f}, its step-0 "
                        f"value, is what the searcher learns)")
            else:
                if v is not None and (self.best is None or v < self.best):
                    self.best = v
                what = f"{r.get('status')}: {self.metric} {v:.4f} in {r.get('train_time_s', 0):.1f}s of training"
            best = "no finished trial yet" if self.best is None else f"best so far {self.best:.4f}"
            self.out(f"{self._stamp()} trial {trial_index(trial)} {what} ({best}); "
                     f"{self._ended(trials, trial)}/{self.trials or len(trials)} trials ended")
        else:
            self.out(f"{self._stamp()} trial {trial_index(trial)} stopped early at step {r.get('step')} "
                     f"({self.metric} {r.get(self.metric, float('nan')):.4f})")

    @staticmethod
    def _ended(trials, this) -> int:
        """Trials that have ended, this one included (Tune marks it TERMINATED only after the callbacks)."""
        return sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not this) + 1

    def on_trial_error(self, iteration, trials, trial, **info):
        where = getattr(trial, "path", None) or trial.local_path
        why = error_file_line(trial.error_file, 160)
        self.out(f"{self._stamp()} trial {trial_index(trial)} failed:{f' {why};' if why else ''} see {where}/error.txt")


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


class PushSweepFiles(tune.Callback):
    """After every trial's end, the sweep's own files (the Optuna journal, the scheduler's state, done markers)
    from the driver's copy to a URI storage (sweeps.storage), so that a driver lost on this machine can be
    resumed from another."""

    def __init__(self, storage_root: str, name: str):
        self.storage_root, self.name = storage_root, name

    def _push(self) -> None:
        from .storage import Storage

        storage = Storage(self.storage_root)
        if storage.remote:
            storage.push_sweep(self.name)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._push()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._push()
