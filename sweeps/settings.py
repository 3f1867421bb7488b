"""What `sweeps/run.py`'s flags mean, resolved once into a typed SweepSettings; the settings a sweep keeps in
its folder (sweep.json) so that `--resume --name N` continues it as it was."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

from sweeps.cluster import BadInput
from sweeps.storage import Storage

SETTINGS_FILE = "sweep.json"
RESUMABLE_KEEP = ("name", "storage", "address", "resume")  # what --resume may still set


@dataclass
class SweepSettings:
    space: str | None = None
    list_spaces: bool = False
    trials: int | None = None
    concurrency: int | None = None
    workers_per_trial: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    reuse_workers: bool = False
    preset: str | None = None
    data: str | None = None
    steps: int | None = None
    sets: list[str] = field(default_factory=list)
    scheduler: str = "asha"
    sampler: str | None = None
    objective: str | None = None
    name: str | None = None
    resume: bool = False
    storage: str = "sweep_runs"
    address: str | None = None
    seed: int = 0
    max_failures: int = 1
    tracking_uri: str | None = None
    track: str | None = None
    record_time: float | None = None
    target: float | None = None
    confirm_top: int = 0
    confirm_runs: int = 3
    inject_faults: str | None = None
    trainer: str | None = None
    env: list[str] = field(default_factory=list)
    list_knobs: str | None = None
    stall_timeout: float = 900.0
    resource_timeout: float = 1800.0

    def storage_location(self) -> Storage:
        """--storage: the folder (made absolute) or URI holding sweep folders."""
        return Storage.parse(self.storage)

    def name_or_default(self, space_name: str) -> str:
        """--name, else SPACE-YYYYmmdd-HHMMSS-xxxx: two sweeps started in the same second never share a folder."""
        return self.name or f"{space_name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"

    def save(self, folder: Path, tracking_uri: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        stored = {k: v for k, v in asdict(self).items() if k not in RESUMABLE_KEEP}
        stored["tracking_uri"] = tracking_uri
        (folder / SETTINGS_FILE).write_text(json.dumps(stored, indent=1))

    def resumed(self) -> "SweepSettings":
        """--resume --name N: the stored settings of sweep N, refusing flags that would change it."""
        if not self.name:
            raise BadInput("--resume needs --name NAME of the sweep to continue")
        storage = self.storage_location()
        storage.pull(self.name)  # a URI's sweep: its own files to this node's copy (Ray's state Ray restores)
        path = storage.local(self.name) / SETTINGS_FILE
        if not path.exists():
            known = storage.sweeps()
            raise BadInput(f"--resume: no sweep named {self.name!r} in {storage} "
                           f"({'sweeps there: ' + ', '.join(known) if known else 'no sweeps there'}): "
                           f"check --name and --storage, or start it without --resume")
        stored = json.loads(path.read_text())
        defaults = asdict(parse_settings([]))
        for key, value in asdict(self).items():
            if key in RESUMABLE_KEEP or value == defaults.get(key) or value == stored.get(key):
                continue
            raise BadInput(f"--resume continues sweep {self.name!r} with its own settings: drop "
                           f"--{key.replace('_', '-')} (start a new sweep to change it)")
        known = {f.name for f in fields(SweepSettings)}
        merged = {**defaults, **{k: v for k, v in stored.items() if k in known},
                  **{k: getattr(self, k) for k in RESUMABLE_KEEP}}
        return SweepSettings(**merged)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speedrun-sweep", description="A Ray Tune sweep of the speedrun trainer: "
                                "Optuna proposes, each trial is a Ray Train run, MLflow records every trial.")
    p.add_argument("--space", help="a named space (see --list-spaces) or a .toml file")
    p.add_argument("--list-spaces", action="store_true", help="print the shipped spaces and exit")
    p.add_argument("--trials", type=int, help="number of trials, >= 1 (default: the space's, per preset)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: as many as the resources fit)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default: all GPUs, or 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default 1 with GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--reuse-workers", action="store_true",
                   help="run one-worker trials in warm trainer processes, one per trial slot, kept for the whole "
                        "sweep: a trial reuses what torch compiled for the trials before it (README: Warm trials)")
    p.add_argument("--preset", choices=["record", "tiny", "record-sample", "public-2508"],
                   help="default: record with CUDA + FineWeb, else tiny; record-sample: the record model on the "
                        "generated corpus (a GPU demo with a track of its own)")
    p.add_argument("--data", help="folder of FineWeb .bin shards (default $SPEEDRUN_DATA or data/fineweb10B); "
                   "checked before anything starts, never written into")
    p.add_argument("--steps", type=int, help="compress each trial's whole schedule into N steps (default: the "
                   "space's; 0 = the preset's own schedule)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed value for every trial, applied after --steps exactly as given, e.g. "
                        "--set data.val_tokens=1048576 (a searched knob cannot be set)")
    p.add_argument("--scheduler", choices=["asha", "curve", "none"], default="asha",
                   help="early stopping: asha (default), curve (the record-curve pruner: stop trials that fall "
                        "behind the control's loss curve at equal schedule fractions), none")
    p.add_argument("--sampler", choices=["tpe", "gp", "cmaes", "random"],
                   help="Optuna sampler (default: the space's `sampler`, else the measured default, see the README's "
                        "sampler table); its first trials are random, a quarter of the budget (2 to 10)")
    p.add_argument("--objective", choices=["loss", "time", "pareto"],
                   help="what the searcher minimises: loss (final val loss at the step budget), time (end-of-run "
                        "time projected through the track's exchange rate) or pareto (both; multi-objective). "
                        "Default: the space's `objective`, else loss")
    p.add_argument("--name", help="sweep name (default: SPACE-YYYYmmdd-HHMMSS-xxxx)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep --name with its own settings: finished trials are kept, "
                        "unfinished ones restart, the searcher keeps its history")
    p.add_argument("--storage", default=os.environ.get("SPEEDRUN_SWEEPS", "sweep_runs"),
                   help="folder or URI holding sweep folders (default ./sweep_runs or $SPEEDRUN_SWEEPS)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--max-failures", type=int, default=1, help="Ray Train retries of a failed trial (default 1)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db in the working folder)")
    p.add_argument("--track", help="target loss and record time to judge trials by (default: the track of "
                   "sweeps/tracks.toml or $SPEEDRUN_TRACKS that holds for the trials' data, validation set and "
                   "step budget; a track that does not hold is refused)")
    p.add_argument("--record-time", type=float, help="override the track's record time (seconds)")
    p.add_argument("--target", type=float, help="override the track's target validation loss")
    p.add_argument("--confirm-top", type=int, default=0, metavar="K",
                   help="after the sweep, re-run the K best trials with fresh seeds and rank them by the mean")
    p.add_argument("--confirm-runs", type=int, default=3, metavar="M", help="seeds per re-run trial (default 3)")
    add_script_flags(p)
    p.add_argument("--resource-timeout", type=float, default=1800.0, metavar="S",
                   help="a trial whose workers cannot get their CPUs/GPUs within S seconds fails with that reason "
                        "instead of waiting (default 1800; raise it for a cluster that must scale up first)")
    p.add_argument("--inject-faults", help=argparse.SUPPRESS)  # test-only, see sweeps.trial.FaultPlan
    return p


def add_script_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a sweep of a contributor's own train_gpt.py (sweeps/script_plan.py)."""
    p.add_argument("--trainer", metavar="PATH", help="sweep your own train_gpt.py instead of the speedrun trainer: "
                   "each trial runs a copy of it with the space's knobs set, one process per worker as torchrun "
                   "would (README: Sweeping your own train_gpt.py)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="with --trainer: environment of every trial's script, e.g. --env NUM_ITERS=60")
    p.add_argument("--list-knobs", metavar="PATH", help="print what can be swept in a train_gpt.py and exit")
    p.add_argument("--stall-timeout", type=float, default=900.0, metavar="S",
                   help="a trial that reports nothing for S seconds (after its first report; before it, for "
                        "--resource-timeout + S, which covers a cold compile) is killed and fails as stalled; with "
                        "--trainer, also a script that prints nothing for S seconds (default 900)")


def parse_settings(argv: list[str] | None) -> SweepSettings:
    return SweepSettings(**vars(build_parser().parse_args(argv)))
