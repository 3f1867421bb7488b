"""Read the results of finished speedrun runs from their log files.

The public trainer (and ours, `speedrun/`) prints a validation line such as

    step:1390/1390 val_loss:3.2775 train_time:79532ms step_avg:57.22ms

every so often and once at the end of the schedule; lines without `val_loss` (the per-step training lines
`step:12/1390 train_time:...ms step_avg:...ms`) are not validations. A run's result is the last validation
line in its file; a prefix before `step:` (Ray's `(RayTrainWorker pid=...)`, a time stamp) is allowed. The
record folders of modded-nanogpt hold one such file per run (`<uuid>.txt`, with the trainer's source code
printed at the top, which never matches: its format strings hold `{step}`, not numbers). A diverged run's
`val_loss:nan` is read as nan.

`parse_log(path)` reads one file, `read_log_dir(folder)` every `*.txt` / `*.log` file of a folder (not its
sub-folders), one run per file, in file-name order. A run whose last validation came before the end of its
schedule (`step:N/M` with N < M) is kept and marked `complete=False`; the caller decides what to do with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

LOG_SUFFIXES = (".txt", ".log")

# step:N/M val_loss:X train_time:Yms, then anything (step_avg, ...). The loss may be nan/inf (a diverged run).
_VAL_LINE = re.compile(
    r"(?<![\w/])step:(?P<step>\d+)/(?P<total>\d+)\s+val_loss:(?P<loss>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
    r"\s+train_time:(?P<ms>\d+(?:\.\d+)?)ms(?:\s|$)",
    re.IGNORECASE,
)


# step:N/M train_time:Yms: a training step's line (no validation)
_STEP_LINE = re.compile(r"(?<![\w/])step:(?P<step>\d+)/(?P<total>\d+)\s+train_time:(?P<ms>\d+(?:\.\d+)?)ms(?:\s|$)")


def step_line(line: str) -> dict | None:
    """One line of a run's output as a report: {step, total_steps, train_time_s[, val_loss]}, or None."""
    m = _VAL_LINE.search(line)
    if m:
        return {"step": int(m["step"]), "total_steps": int(m["total"]), "train_time_s": float(m["ms"]) / 1000,
                "val_loss": float(m["loss"])}
    m = _STEP_LINE.search(line)
    if m:
        return {"step": int(m["step"]), "total_steps": int(m["total"]), "train_time_s": float(m["ms"]) / 1000}
    return None


class LogError(ValueError):
    """A log file or folder that does not hold what a speedrun run log holds."""


@dataclass(frozen=True)
class LoggedRun:
    """One run's result read from its log: the last validation line, and every validation before it."""

    path: Path
    final_step: int
    total_steps: int
    val_loss: float
    train_time_s: float
    history: tuple[tuple[int, float, float], ...]  # (step, val_loss, train_time_s) of every validation line

    @property
    def name(self) -> str:
        """The file name without its suffix (the run id in the record folders)."""
        return self.path.stem

    @property
    def complete(self) -> bool:
        """Whether the last validation was at the end of the schedule (step N of N)."""
        return self.final_step == self.total_steps


def parse_val_line(line: str) -> tuple[int, int, float, float] | None:
    """(step, total_steps, val_loss, train_time_s) of a validation line, or None for any other line."""
    m = _VAL_LINE.search(line)
    if m is None:
        return None
    return int(m["step"]), int(m["total"]), float(m["loss"]), float(m["ms"]) / 1000.0


def parse_log(path: str | Path) -> LoggedRun:
    """Read one run's log; its result is the last `step:N/M val_loss:X train_time:Yms` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LogError(f"{path}: cannot read the log ({e.strerror or e})") from e
    history = []
    total = None
    for line in text.splitlines():
        parsed = parse_val_line(line)
        if parsed is not None:
            step, total, loss, seconds = parsed
            history.append((step, loss, seconds))
    if not history:
        raise LogError(f"{path}: no validation line like 'step:N/M val_loss:X train_time:Yms' (not a speedrun log?)")
    step, loss, seconds = history[-1]
    if not math.isfinite(seconds):
        raise LogError(f"{path}: the last validation line has no usable train_time")
    return LoggedRun(path=path, final_step=step, total_steps=total, val_loss=loss, train_time_s=seconds,
                     history=tuple(history))


def log_files(folder: str | Path) -> list[Path]:
    """The run logs of a folder (`*.txt`, `*.log`, not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LogError(f"{folder}: not a folder (expected a folder of run logs, one *.txt or *.log per run)")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in LOG_SUFFIXES)


def read_log_dir(folder: str | Path) -> list[LoggedRun]:
    """Every run log of a folder, one run per file, in file-name order."""
    files = log_files(folder)
    if not files:
        raise LogError(f"{folder}: holds no run logs (expected one *.txt or *.log file per run)")
    return [parse_log(p) for p in files]
