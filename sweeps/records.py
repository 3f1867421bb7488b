"""Tracks (target loss, record time, provenance), time to target, and whether a trial beat the record."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from speedrun.train import time_to_target

TRACKS_FILE = Path(__file__).resolve().parent / "tracks.toml"


@dataclass(frozen=True)
class Track:
    name: str
    description: str
    target_loss: float
    record_time_s: float
    record_steps: int
    source: str
    exchange_rate: float | None = None  # loss gained per 100 more steps near the end of the schedule
    noise: float | None = None  # seed-to-seed standard deviation of the final val loss
    curve: tuple = ()  # (schedule fraction, val loss) of the control, for the record-curve pruner
    curve_steps: int = 0  # the step budget that curve was measured at (a curve holds for that budget only)


def load_tracks(path: Path = TRACKS_FILE) -> dict[str, Track]:
    raw = tomllib.loads(path.read_text())
    fields = set(Track.__dataclass_fields__) - {"name"}
    tracks = {}
    for name, t in raw.items():
        kw = {k: v for k, v in t.items() if k in fields}
        kw["curve"] = tuple((float(f), float(v)) for f, v in kw.get("curve", ()))
        tracks[name] = Track(name=name, **kw)
    return tracks


def get_track(name: str, target: float | None = None, record_time: float | None = None) -> Track:
    tracks = load_tracks()
    if name not in tracks:
        raise ValueError(f"unknown track {name!r}: known tracks are {', '.join(tracks)}")
    track = tracks[name]
    if target is not None:
        track = replace(track, target_loss=target, source=track.source + f"; target overridden to {target}")
    if record_time is not None:
        track = replace(track, record_time_s=record_time,
                        source=track.source + f"; record time overridden to {record_time}s")
    return track


def default_track(preset: str) -> str:
    return "track1" if preset == "record" else "tiny"


@dataclass(frozen=True)
class Verdict:
    time_to_target_s: float | None
    reached: bool
    beat_record: bool


def judge(history: list[dict], track: Track) -> Verdict:
    """history: validation points (val_loss, train_time_s) in order."""
    t = time_to_target(history, track.target_loss)
    return Verdict(t, t is not None, t is not None and t < track.record_time_s)


def projected_time_to_target(history: list[dict], track: Track) -> float:
    """Time to target for the time objective: measured when the run reached the target; otherwise the time
    it would have needed, at its own time per step, for the steps that the track's exchange rate (loss per
    100 steps) says the remaining loss gap costs. Finite for any finite loss, so the searcher can rank misses."""
    t = time_to_target(history, track.target_loss)
    if t is not None:
        return t
    if not track.exchange_rate:
        raise ValueError(f"track {track.name} has no exchange_rate: the time objective cannot project a miss")
    last = history[-1]
    steps, seconds = max(1, last["step"]), last["train_time_s"]
    missing_steps = 100.0 * (last["val_loss"] - track.target_loss) / track.exchange_rate
    return seconds + missing_steps * seconds / steps
