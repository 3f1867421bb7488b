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
    exchange_rate: float | None = None


def load_tracks(path: Path = TRACKS_FILE) -> dict[str, Track]:
    raw = tomllib.loads(path.read_text())
    fields = set(Track.__dataclass_fields__) - {"name"}
    return {name: Track(name=name, **{k: v for k, v in t.items() if k in fields}) for name, t in raw.items()}


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
