"""Tracks and the verdict on one run.

A track is a target loss and a record time together with what they were measured on: the data source,
the validation shards and token count (and a sha256 of those tokens), the step budget where it has one,
and the record's run-to-run spreads. A run is judged against a track only when it was measured on the same
things; otherwise it is "not comparable".

A run's time is its training time at the end of its schedule, and it reached the target iff its final
validation loss is <= the target (mid-run validations come from an un-annealed model and never count).
One run is at most a `candidate`; only the multi-run acceptance test (sweeps/acceptance.py) says `record`.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .protocol import TrialStatus

TRACKS_FILE = Path(__file__).resolve().parent / "tracks.toml"

# The verdict words, everywhere: MLflow tag `verdict`, results.parquet, the sweep's table, report.py, record.py.
# A run that did not end its schedule is called by how it ended (protocol.TrialStatus).
RECORD = "record"  # only a multi-run acceptance test
CANDIDATE = "candidate"  # reached the target, faster than the record by more than the track's time noise
REACHED = "reached"  # reached the target, not clearly faster
MISSED = "missed"  # ended its schedule above the target
NOT_COMPARABLE = "not comparable"  # measured on other data, another validation set or another step budget
DIVERGED, FAILED = TrialStatus.DIVERGED.value, TrialStatus.FAILED.value
PRUNED, INTERRUPTED = TrialStatus.PRUNED.value, TrialStatus.INTERRUPTED.value


# Two runs whose final losses differ by less than this many seed-to-seed standard deviations (the track's
# `noise`) are not told apart: 2 sigma of the difference of two runs, 2 * sqrt(2) ~ 2.83.
NOISE_SIGMAS = 2 * math.sqrt(2)


def within_noise(gap: float, noise: float | None) -> bool:
    """Whether a loss gap between two single runs is one that seeds alone make (False when noise is unknown)."""
    return bool(noise) and abs(gap) <= NOISE_SIGMAS * noise


@dataclass(frozen=True)
class Measured:
    """What a run's loss and time were measured on."""
    data_source: str  # "fineweb" | "sample"
    val_pattern: str
    val_tokens: int
    steps: int  # the run's step budget (its whole schedule)
    val_sha256: str = ""  # of the first val_tokens validation tokens; "" when not computed


@dataclass(frozen=True)
class Track:
    name: str
    description: str
    target_loss: float
    record_time_s: float
    source: str  # where the record's numbers come from
    data_source: str
    val_pattern: str
    val_tokens: int
    step_budget: int = 0  # 0: no step budget (the speedrun fixes data and target, not steps)
    val_sha256: str = ""  # "" = not known: the other fields are still checked
    time_noise: float | None = None  # run-to-run standard deviation of the record's time (s)
    record_runs: int | None = None  # runs the record time is the mean of
    hardware: str = ""  # where the record time was measured (times compare on one kind of machine only)
    record_steps: int = 0  # the record's own run length (informational)
    exchange_rate: float | None = None  # loss gained per 100 more steps near the end of the schedule
    noise: float | None = None  # seed-to-seed standard deviation of the final val loss
    curve: tuple = ()  # (schedule fraction, val loss) of the control, for the record-curve pruner
    curve_steps: int = 0  # the step budget that curve was measured at

    def differences(self, run: Measured, ignore_steps: bool = False) -> list[str]:
        """Why this track does not hold for `run` (empty: it does). `ignore_steps`: only the data and the
        validation set count (a run timed against baseline runs may change the step count)."""
        out = []
        if run.data_source != self.data_source:
            out.append(f"data {run.data_source} (track {self.name}: {self.data_source})")
        if run.val_pattern != self.val_pattern:
            out.append(f"validation shards {run.val_pattern} (track {self.name}: {self.val_pattern})")
        if run.val_tokens != self.val_tokens:
            out.append(f"{run.val_tokens:,} validation tokens (track {self.name}: {self.val_tokens:,})")
        if self.step_budget and run.steps != self.step_budget and not ignore_steps:
            out.append(f"{run.steps} steps (track {self.name}: {self.step_budget})")
        if self.val_sha256 and run.val_sha256 and run.val_sha256 != self.val_sha256 and not out:
            out.append(f"validation tokens with sha256 {run.val_sha256[:12]}… "
                       f"(track {self.name}: {self.val_sha256[:12]}…)")
        return out

    def summary(self) -> str:
        noise = f" ± {self.time_noise:g}s" if self.time_noise else ""
        return f"{self.name} ({self.target_loss} in {self.record_time_s:g}s{noise})"


def track_files() -> list[Path]:
    """The shipped tracks.toml, then the files named in $SPEEDRUN_TRACKS (os.pathsep-separated): a
    contributor's own tracks, measured with sweeps/calibrate.py; a later file's track replaces an earlier one."""
    extra = [Path(p).expanduser() for p in os.environ.get("SPEEDRUN_TRACKS", "").split(os.pathsep) if p]
    return [TRACKS_FILE, *extra]


def load_tracks(paths: list[Path] | None = None) -> dict[str, Track]:
    raw = {}
    for path in paths or track_files():
        try:
            raw.update(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"tracks file {path}: {e}: fix it or SPEEDRUN_TRACKS") from None
    fields = set(Track.__dataclass_fields__) - {"name"}
    tracks = {}
    for name, t in raw.items():
        kw = {k: v for k, v in t.items() if k in fields}
        kw["curve"] = tuple((float(f), float(v)) for f, v in kw.get("curve", ()))
        tracks[name] = Track(name=name, **kw)
    return tracks


def with_overrides(track: Track, target: float | None = None, record_time: float | None = None) -> Track:
    if target is not None:
        track = replace(track, target_loss=target, source=track.source + f"; target overridden to {target}")
    if record_time is not None:
        track = replace(track, record_time_s=record_time,
                        source=track.source + f"; record time overridden to {record_time}s")
    return track


def get_track(name: str, target: float | None = None, record_time: float | None = None) -> Track:
    tracks = load_tracks()
    if name not in tracks:
        raise ValueError(f"unknown track {name!r}: known tracks are {', '.join(tracks)}")
    return with_overrides(tracks[name], target, record_time)


@dataclass(frozen=True)
class Judge:
    """A track and whether it holds for the runs being judged (`differences` empty)."""
    track: Track
    differences: tuple[str, ...] = ()

    @property
    def comparable(self) -> bool:
        return not self.differences

    def describe(self) -> str:
        if self.comparable:
            return f"track {self.track.summary()}"
        return (f"not comparable with any track: closest is {self.track.name}, which differs in "
                f"{'; '.join(self.differences)}; trials get no record verdict")

    ignore_steps: bool = False

    def for_run(self, run: Measured) -> "Judge":
        """The same track, checked against one run (a searched knob may change what a trial measures)."""
        return Judge(self.track, tuple(self.track.differences(run, self.ignore_steps)), self.ignore_steps)

    def verdict(self, status: str, val_loss: float | None, train_time_s: float | None) -> str:
        return run_verdict(status, val_loss, train_time_s, self.track, self.comparable)


def choose_track(run: Measured, name: str | None = None, target: float | None = None,
                 record_time: float | None = None, tracks: dict[str, Track] | None = None,
                 ignore_steps: bool = False) -> Judge:
    """`name` given: that track, refused (ValueError naming the difference) unless it holds for the run.
    Otherwise the first track that holds, or the closest one marked not comparable."""
    tracks = load_tracks() if tracks is None else tracks
    if name is not None:
        if name not in tracks:
            raise ValueError(f"unknown track {name!r}: known tracks are {', '.join(tracks)}")
        diffs = tracks[name].differences(run, ignore_steps)
        if diffs:
            raise ValueError(f"--track {name} does not hold for this run: it has {'; '.join(diffs)}: "
                             f"drop --track (the matching track is chosen) or run on the track's data and budget")
        return Judge(with_overrides(tracks[name], target, record_time), (), ignore_steps)
    ranked = sorted(tracks.values(), key=lambda t: (len(t.differences(run, ignore_steps)),
                                                    t.data_source != run.data_source))
    best = ranked[0]
    return Judge(with_overrides(best, target, record_time), tuple(best.differences(run, ignore_steps)), ignore_steps)


def run_verdict(status: str, val_loss: float | None, train_time_s: float | None, track: Track,
                comparable: bool = True) -> str:
    """The word for one run's end: failed / diverged / pruned / interrupted by how it ended; otherwise not
    comparable, candidate, reached or missed by its final loss and end-of-run time."""
    if status in (FAILED, DIVERGED, PRUNED, INTERRUPTED):
        return status
    if not comparable:
        return NOT_COMPARABLE
    if val_loss is None or train_time_s is None or not val_loss <= track.target_loss:
        return MISSED
    if train_time_s < track.record_time_s - (track.time_noise or 0.0):
        return CANDIDATE
    return REACHED


def runs_verdict(accepted: bool, loss_mean: float, target: float, comparable: bool = True) -> str:
    """The word for several runs of one config (record.py, --confirm-top): record only when the acceptance test
    passed on a comparable track; otherwise reached or missed by the mean final loss."""
    if not comparable:
        return NOT_COMPARABLE
    if accepted:
        return RECORD
    return REACHED if loss_mean <= target else MISSED


def projected_time_s(val_loss: float, train_time_s: float, steps: int, track: Track) -> float:
    """An estimate for the time objective, not a measurement: the run's end-of-run time, moved by the steps
    that its gap to the target is worth at the track's exchange rate (loss per 100 steps). A run that ended
    below the target could have stopped earlier, one above needed more; both are projected the same way.
    The projection never goes below half the run (a linear rate is not trusted further out)."""
    if not track.exchange_rate:
        raise ValueError(f"track {track.name} has no exchange_rate: the time objective cannot project a run")
    steps = max(1, steps)
    needed = steps + 100.0 * (val_loss - track.target_loss) / track.exchange_rate
    return train_time_s * max(needed, 0.5 * steps) / steps
