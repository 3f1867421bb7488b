"""A sweep of a contributor's own train_gpt.py (`--trainer PATH`), resolved and checked before Ray starts: the
file's knobs, the space over them, the worker layout, the trial unit (sweeps.script_trial) and the Tune plan.

The script's validation data is its own business (it reads its own paths), so speedrun-sweeps cannot check that
a track holds for it: its trials are judged "not comparable" (no record words), and what needs a track that holds
(`--objective time`, `--scheduler curve`) is refused. ASHA reads the losses the script prints.
"""

from __future__ import annotations

from pathlib import Path

from sweeps.cluster import BadInput, ray_env, resources_for, trial_env, worker_layout
from sweeps.settings import SweepSettings


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise BadInput(f"--env {item!r}: expected KEY=VALUE, e.g. --env NUM_ITERS=60")
        env[key] = value
    return env


def script_steps(steps: int | None, env: dict[str, str]) -> int:
    """The script's number of steps, which ASHA's rungs and the progress are laid out on: --steps (or the space's
    defaults.steps), else NUM_ITERS of --env."""
    if steps:
        return steps
    if env.get("NUM_ITERS", "").isdigit():
        return int(env["NUM_ITERS"])
    raise BadInput("--trainer: the number of steps each trial runs is not known: pass --steps N (the script's "
                   "step count, as its `step:N/M` lines print it) or --env NUM_ITERS=N if the script reads it")


def check_script_flags(s: SweepSettings) -> Path:
    """The flags of a script sweep that can be checked alone; returns the trainer's absolute path."""
    if s.trials is not None and s.trials < 1:
        raise BadInput(f"--trials {s.trials}: a sweep needs at least 1 trial")
    if s.max_failures < 0:
        raise BadInput(f"--max-failures {s.max_failures}: must be >= 0")
    trainer = Path(s.trainer).expanduser().resolve()
    if not trainer.is_file():
        raise BadInput(f"--trainer {s.trainer}: no such file: give the path of your train_gpt.py")
    if not s.space:
        raise BadInput("--space is required with --trainer: a .toml file whose params are the file's knobs "
                       f"(see --list-knobs {s.trainer})")
    for flag, value in (("--preset", s.preset), ("--set", s.sets), ("--track", s.track),
                        ("--reuse-workers", s.reuse_workers)):
        if value:
            raise BadInput(f"{flag} applies to the speedrun trainer, not to --trainer: set your file's knobs in the "
                           f"space's [fixed] table, its environment with --env")
    return trainer


def plan_script_sweep(s: SweepSettings):
    from sweeps.plan import Sweep, make_plan
    from sweeps.records import Judge, load_tracks
    from sweeps.script_space import load_script_space
    from sweeps.script_trial import ScriptSpec
    from sweeps.spaces import SpaceError
    from sweeps.tracking import code_version, resolve_uri

    if s.resume:
        s = s.resumed()
    trainer = check_script_flags(s)
    env = parse_env(s.env)
    if s.data:
        env.setdefault("DATA_PATH", str(Path(s.data).expanduser().resolve()))
    try:
        space = load_script_space(s.space, str(trainer), env)
    except SpaceError as e:
        raise BadInput(str(e)) from None
    steps = script_steps(s.steps or space.steps, env)
    objective = s.objective or space.objective
    if objective == "time" or s.scheduler == "curve":
        raise BadInput(f"{'--objective time' if objective == 'time' else '--scheduler curve'} needs a track that holds "
                       "for the trials' data, which speedrun-sweeps cannot check for your own script: use "
                       "--objective loss and --scheduler asha")
    res = resources_for(s.address)
    try:
        use_gpu, gpus_per_worker, workers = worker_layout(s, "auto", res, gpu_by_default=True)
    except ValueError as e:
        raise BadInput(str(e)) from None
    tracks = load_tracks()
    track = tracks["track1"] if "track1" in tracks else next(iter(tracks.values()))
    judge = Judge(track, ("a contributor's script: its validation data is not checked",))
    plan = make_plan(s, space, (use_gpu, gpus_per_worker, workers), res, steps, objective, None)
    folder = plan.folder
    ray_env()
    spec = ScriptSpec(space=space, source_path=str(trainer), code_dir=str(folder / "trial_code"), workers=workers,
                      use_gpu=use_gpu, cpus_per_worker=s.cpus_per_worker, gpus_per_worker=gpus_per_worker,
                      env={**trial_env(folder, s.cpus_per_worker, s.resource_timeout, plan.storage), **env,
                           # Ray Train then shows each worker all of its trial's GPUs on the node (script_trial.py)
                           **({"TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES": "1"} if use_gpu else {})},
                      train_storage=plan.storage.uri(plan.name, "train_runs"), storage=plan.storage.root,
                      max_failures=s.max_failures, done_dir=str(folder / "done"), stall_s=s.stall_timeout,
                      code_version=code_version())
    uri = resolve_uri(s.tracking_uri)
    from sweeps.plan import check_tracking_uri
    check_tracking_uri(uri)
    return Sweep(s, space, spec, plan, judge, uri, "script", use_gpu, s.resume and plan.storage.exists(plan.name, "tuner.pkl"))
