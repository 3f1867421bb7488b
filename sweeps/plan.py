"""A sweep resolved and checked before Ray starts: the space, the data, the worker layout, the track its
trials are judged by, the trial unit's spec and the Tune plan. Bad input raises BadInput (exit 2)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sweeps.cluster import (BadInput, Resources, concurrency_for, ray_env, resources_for, trial_env,
                            worker_layout)
from sweeps.settings import SETTINGS_FILE, SweepSettings


@dataclass
class Sweep:
    """Everything a sweep needs, resolved once."""
    settings: SweepSettings
    space: object  # spaces.Space
    spec: object  # trial.TrialSpec: the trial unit, with every override the trials share
    plan: object  # search.SweepPlan: what Tune runs
    judge: object  # records.Judge: the track and whether it holds for this sweep's runs
    uri: str  # MLflow tracking URI
    preset: str
    use_gpu: bool
    restore: bool  # --resume of a sweep whose Tune state exists

    @property
    def workers(self) -> int:
        return self.spec.workers


def choose_preset(s: SweepSettings, res: Resources) -> str:
    """--preset, else record with CUDA and FineWeb shards, else tiny (on CPU; on --data's shards if given)."""
    from sweeps.sweep_data import fineweb_dir, has_fineweb

    if s.preset:
        return s.preset
    if res.most().get("GPU", 0) and (s.data or has_fineweb(None)):
        return "record"  # a given --data that is unusable is refused by prepare_data, never swapped
    if s.data:
        print(f"notice: no GPU in {res.where}: sweeping the tiny model on the FineWeb shards in {fineweb_dir(s.data)} "
              f"(pass --preset record to insist)", file=sys.stderr)
    else:
        why = f"no GPU in {res.where}" if not res.most().get("GPU", 0) else f"no FineWeb shards in {fineweb_dir(None)}"
        print(f"notice: {why}: sweeping the tiny preset on CPU with the generated sample corpus "
              f"(pass --preset record to insist)", file=sys.stderr)
    return "tiny"


def load_space_and_data(s: SweepSettings, preset: str):
    """(space, steps, --set values, the control's config, driver overrides): checked before the heavy imports
    (Ray, MLflow, Optuna), so that bad data or a bad space is refused in seconds."""
    from speedrun.config import parse_overrides
    from sweeps.sweep_data import BadData, prepare_data
    from sweeps.spaces import SpaceError, load_space

    if s.trials is not None and s.trials < 1:
        raise BadInput(f"--trials {s.trials}: a sweep needs at least 1 trial")
    if s.max_failures < 0:
        raise BadInput(f"--max-failures {s.max_failures}: must be >= 0")
    try:
        space = load_space(s.space, preset)
        sets = parse_overrides(s.sets)
        searched = sorted(set(sets) & {p.key for p in space.params})
        if searched:
            raise BadInput(f"--set {searched[0]}: space {space.name} searches that knob; drop the --set, or use a "
                           "space without it")
        steps = s.steps if s.steps is not None else space.steps
        control = space.trial_config(space.control_point(), steps).override(sets)
        overrides = {**sets, **prepare_data(control, s.data)}
    except (SpaceError, BadData, ValueError) as e:
        raise BadInput(str(e)) from None
    return space, steps, control.override(overrides), overrides


def choose_judge(s: SweepSettings, control, objective: str):
    """The track that holds for the trials (or the closest, not comparable); refuses what needs one that holds."""
    from sweeps.sweep_data import BadData, Fingerprints, measured
    from sweeps.records import choose_track

    try:
        judge = choose_track(measured(control, Fingerprints()), s.track, s.target, s.record_time)
    except (BadData, ValueError) as e:
        raise BadInput(str(e)) from None
    track = judge.track
    if objective == "time" and not (judge.comparable and track.exchange_rate):
        why = f"track {track.name} has no exchange_rate" if judge.comparable else judge.describe()
        raise BadInput(f"--objective time projects times through a track that holds for the run: {why}; "
                       f"use --objective loss")
    if s.scheduler == "curve" and not (judge.comparable and track.noise):
        why = f"track {track.name} has no noise" if judge.comparable else judge.describe()
        raise BadInput(f"--scheduler curve needs the seed-to-seed noise of a track that holds for the run: {why}; "
                       f"use --scheduler asha")
    return judge


def make_plan(s: SweepSettings, space, layout: tuple, res: Resources, total_steps: int, objective: str, track):
    """The Tune plan of a sweep (of the speedrun trainer or of a script): its name, trials, concurrency and sampler
    checked, and the folder of a new sweep not taken."""
    from sweeps.samplers import DEFAULT_SAMPLER, SamplerError
    from sweeps.search import SweepPlan, sampler_choice

    use_gpu, gpus_per_worker, workers = layout
    trials = s.trials if s.trials is not None else space.trials
    s.name = s.name_or_default(space.name)
    plan = SweepPlan(space, s.name, s.storage_location(), trials, concurrency_for(s, use_gpu, gpus_per_worker, workers,
                     res, trials), s.seed, s.scheduler, total_steps, objective, track,
                     s.sampler or space.sampler or DEFAULT_SAMPLER)
    try:
        sampler_choice(plan)
    except SamplerError as e:
        raise BadInput(f"--sampler {plan.sampler}: {e}") from None
    try:
        plan.storage.check()
    except OSError as e:
        raise BadInput(f"--storage {plan.storage} is not usable ({str(e).splitlines()[0][:160]}): create the folder or "
                       "bucket, or fix its credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    if not s.resume and plan.storage.exists(plan.name, SETTINGS_FILE):
        raise BadInput(f"sweep {s.name!r} already exists in {plan.storage}: pass --resume to continue it, "
                       f"or choose another --name")
    return plan


def plan_sweep(s: SweepSettings) -> Sweep:
    """Check every input and resolve the sweep; BadInput on anything that cannot run."""
    from sweeps.spaces import available_spaces

    if s.resume:
        s = s.resumed()
    if not s.space:
        raise BadInput(f"--space is required: one of {', '.join(available_spaces())} (see --list-spaces)")
    res = resources_for(s.address)
    preset = choose_preset(s, res)
    space, steps, control, overrides = load_space_and_data(s, preset)

    from sweeps.tracking import code_version, resolve_uri
    from sweeps.trial import FaultPlan, TrialSpec

    try:
        use_gpu, gpus_per_worker, workers = worker_layout(s, control.run.device, res, gpu_by_default=preset != "tiny")
        faults = FaultPlan.parse(s.inject_faults) if s.inject_faults else None
    except ValueError as e:
        raise BadInput(str(e)) from None
    if s.reuse_workers and workers > 1:
        raise BadInput(f"--reuse-workers keeps one-worker trials warm; these trials have {workers} workers: "
                       "add --workers-per-trial 1, or drop --reuse-workers")
    if not use_gpu:  # CPU reservations train on the CPU, never on a GPU no trial reserved
        overrides.update({"run.threads": max(1, int(s.cpus_per_worker)), "run.device": "cpu"})
    objective = s.objective or space.objective
    judge = choose_judge(s, control, objective)
    overrides["run.target_loss"] = judge.track.target_loss
    plan = make_plan(s, space, (use_gpu, gpus_per_worker, workers), res, control.schedule.total_steps, objective,
                     judge.track)
    folder = plan.folder
    ray_env()
    spec = TrialSpec(space=space, overrides=overrides, steps=steps, workers=workers, use_gpu=use_gpu,
                     cpus_per_worker=s.cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     train_storage=plan.storage.uri(plan.name, "train_runs"), max_failures=s.max_failures,
                     env=trial_env(folder, s.cpus_per_worker, s.resource_timeout, plan.storage),
                     log_dir=str(folder / "logs"), code_version=code_version(), faults=faults,
                     done_dir=str(folder / "done"), track=judge.track if judge.comparable else None,
                     compile_cache=plan.storage.uri(plan.name, "compile_cache"), storage=plan.storage.root)
    uri = resolve_uri(s.tracking_uri)
    check_tracking_uri(uri)
    return Sweep(s, space, spec, plan, judge, uri, preset, use_gpu, s.resume and plan.storage.exists(plan.name, "tuner.pkl"))


def check_tracking_uri(uri: str) -> None:
    """Refuse an MLflow store that cannot be reached, quickly (MLflow itself retries for minutes)."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BadInput(f"MLflow tracking URI {uri} is not reachable ({getattr(e, 'reason', e)}): start the "
                           "server or fix --tracking-uri / MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise BadInput(f"MLflow tracking URI {uri}: folder {folder} does not exist or is not writable: "
                           "fix --tracking-uri / MLFLOW_TRACKING_URI")


def open_tracker(sweep: Sweep):
    """The sweep's MLflow writer (tracking.MlflowTracker); BadInput when the store cannot be used."""
    from sweeps.tracking import MlflowTracker

    w = sweep
    s = w.settings
    params = {"space": w.space.name, "searcher": f"optuna {w.plan.sampler} seed {s.seed}",
              "optuna_study": w.plan.name, "scheduler": s.scheduler,
              "trials": w.plan.trials, "concurrency": w.plan.concurrency, "preset": w.preset,
              "steps": w.plan.total_steps, "objective": w.plan.objective, "workers_per_trial": w.workers,
              "gpus_per_worker": w.spec.gpus_per_worker if w.use_gpu else 0,
              "params": ", ".join(p.key for p in w.space.params), "storage": w.plan.storage.uri(w.plan.name)}
    for attempt in range(5):
        try:
            return MlflowTracker(w.uri, w.space.name, w.plan.name, params, w.judge, w.plan.total_steps,
                                 w.spec.config_for, w.space.metric, files_for=w.spec.trial_files,
                                 judge_each_run=w.preset != "script")
        except Exception as e:  # noqa: BLE001 - any store error; retried, then said in one line
            # A sqlite store busy with another writer (our drivers take turns at its creation: tracking.store_lock;
            # an `mlflow ui` or a user's script do not) is there a moment later.
            if attempt < 4 and w.uri.startswith("sqlite:"):
                time.sleep(1.0 + attempt)
                continue
            raise BadInput(f"MLflow tracking URI {w.uri} is not usable ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}): check --tracking-uri / MLFLOW_TRACKING_URI") from None
