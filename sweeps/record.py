"""`python sweeps/record.py`: one-off final record runs of one config over several fresh seeds, and the verdict.

The config comes from a trial (`--run-id` of its MLflow run, or `--space S --rank 1` for a leaderboard's
best), a JSON file (`--config`: flat dotted keys, as in a trial's config.json), or a preset with `--set`
overrides. Each run goes through the sweep's trial unit (a Ray Train run) with its own seed, writes a
speedrun-format log, and the attempt is logged to MLflow as a parent "record attempt" with a child per seed.
`--torchrun` launches the runs with plain torchrun instead, on a node without Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.run import (Resources, concurrency_for, execute, fail, local_resources, prepare_data,  # noqa: E402
                        ray_env, trial_env, worker_layout)

EXPERIMENT = "record-attempts"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python sweeps/record.py", description=__doc__.splitlines()[0])
    src = p.add_argument_group("where the config comes from (default: --preset)")
    src.add_argument("--run-id", help="an MLflow trial run whose params are the config")
    src.add_argument("--space", help="with --rank: take the config of that space's leaderboard entry")
    src.add_argument("--rank", type=int, default=1, help="leaderboard rank for --space (default 1, the best)")
    src.add_argument("--sweep", help="with --space: only this sweep's trials")
    src.add_argument("--config", help="a JSON file of flat dotted keys (a trial's config.json)")
    src.add_argument("--preset", help="record | tiny (default: tiny without CUDA, else record)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, help="compress the schedule into N steps (for trying the pipeline)")
    p.add_argument("--runs", type=int, default=10, help="runs, each with a fresh seed (default 10)")
    p.add_argument("--first-seed", type=int, default=1000, help="seeds are first-seed, first-seed+1, ...")
    p.add_argument("--track", help="default: track1 for the record preset's data, tiny for the sample corpus")
    p.add_argument("--target", type=float)
    p.add_argument("--record-time", type=float)
    p.add_argument("--workers-per-trial", type=int)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--data")
    p.add_argument("--name", help="attempt name (default record-YYYYmmdd-HHMMSS)")
    p.add_argument("--storage", default=os.environ.get("SPEEDRUN_SWEEPS", "sweep_runs"))
    p.add_argument("--tracking-uri")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    p.add_argument("--torchrun", action="store_true", help="plain torchrun on this node, one run after another")
    return p.parse_args(argv)


def config_from_args(args, uri: str):
    """The config to attempt, and a line saying where it came from."""
    from speedrun.__main__ import parse_sets
    from speedrun.config import TrainConfig

    if args.space and not args.run_id:
        from sweeps.report import leaderboard
        rows = [r for r in leaderboard(uri, args.space, args.sweep) if r["status"] == "finished"]
        if len(rows) < args.rank:
            raise LookupError(f"space {args.space} has {len(rows)} finished trials in {uri}; --rank {args.rank} "
                              "does not exist")
        args.run_id = rows[args.rank - 1]["run_id"]
    if args.run_id:
        from mlflow.tracking import MlflowClient
        run = MlflowClient(uri).get_run(args.run_id)
        cfg, source = TrainConfig.from_dict(run.data.params), f"MLflow run {args.run_id} ({run.info.run_name})"
    elif args.config:
        cfg, source = TrainConfig.from_dict(json.loads(Path(args.config).read_text())), f"file {args.config}"
    else:
        import torch
        preset = args.preset or ("record" if torch.cuda.is_available() else "tiny")
        cfg, source = TrainConfig.preset(preset), f"preset {preset}"
    if args.sets:
        cfg = cfg.override(parse_sets(args.sets))
        source += " with " + ", ".join(args.sets)
    if args.steps:
        cfg = cfg.with_total_steps(args.steps)
        source += f", compressed to {args.steps} steps"
    return cfg, source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from speedrun.data import ShardError
    from sweeps.records import get_track
    from sweeps.tracking import resolve_uri
    from sweeps.verdict import judge_runs

    if args.runs < 1:
        return fail(f"--runs {args.runs}: needs at least 1 (the acceptance test needs 2 or more)")
    uri = resolve_uri(args.tracking_uri)
    try:
        cfg, source = config_from_args(args, uri)
        track = get_track(args.track or ("tiny" if cfg.data.source == "sample" else "track1"), args.target,
                          args.record_time)
        overrides = prepare_data(cfg, args)
    except (ValueError, LookupError, ShardError, OSError) as e:
        return fail(str(e))
    overrides["run.target_loss"] = track.target_loss
    name = args.name or f"record-{datetime.now():%Y%m%d-%H%M%S}"
    storage = Path(args.storage).expanduser().resolve()
    folder = storage / name
    seeds = [args.first_seed + i for i in range(args.runs)]
    print(f"record attempt {name}: {args.runs} runs of {source}; track {track.name} "
          f"(target {track.target_loss}, record {track.record_time_s:g}s); logs in {folder / 'logs'}")
    t0 = time.time()
    if args.torchrun:
        results = run_with_torchrun(cfg.override(overrides), seeds, folder, args)
    else:
        res = local_resources()
        try:
            results = run_with_ray(cfg, overrides, seeds, name, storage, track, uri, args, res)
        except ValueError as e:
            return fail(str(e))
    losses = [r["val_loss"] for r in results]
    times = [r["train_time_s"] for r in results]
    verdict = judge_runs(losses, times, track.target_loss, track.record_time_s)
    print()
    for seed, r in zip(seeds, results):
        print(f"seed {seed}: val_loss {r['val_loss']:.4f}, train_time {r['train_time_s']:.2f}s, {r['status']}")
    print()
    print(verdict.table())
    (folder / "verdict.json").write_text(json.dumps({"source": source, "track": track.name, "seeds": seeds,
                                                      "losses": losses, "times": times, **vars(verdict)}, indent=1))
    if not args.torchrun:
        log_verdict(uri, name, verdict)
    print(f"\n{args.runs} runs in {time.time() - t0:.0f}s; logs: {folder / 'logs'}")
    return 0 if verdict.accepted else 1


def attempt_space(cfg, seeds):
    """The attempt as a Space with one knob, run.seed: trial 0 is the first seed, the rest are 'points'."""
    from sweeps.spaces import Param, Space
    base = cfg.override({"run.seed": seeds[0]})
    return Space(name=EXPERIMENT, description="record attempt", preset="record", fixed=base.to_dict(),
                 params=(Param("run.seed", "int", 0, 2**31 - 1),),
                 points=tuple({"run.seed": s} for s in seeds[1:]), trials=len(seeds))


def run_with_ray(cfg, overrides, seeds, name, storage, track, uri, args, res: Resources) -> list[dict]:
    from sweeps.results import ProgressPrinter, rows_from_grid
    from sweeps.search import SweepPlan, make_tuner
    from sweeps.tracking import MlflowTracker, code_version
    from sweeps.trial import TrialSpec

    use_gpu, gpus_per_worker, workers = worker_layout(args, "record" if res.gpus else "tiny", res)
    if not use_gpu:
        overrides["run.threads"] = max(1, int(args.cpus_per_worker))
    space = attempt_space(cfg, seeds)
    concurrency = concurrency_for(args, use_gpu, gpus_per_worker, workers, res, len(seeds))
    plan = SweepPlan(space, name, storage, len(seeds), concurrency, 0, "none", cfg.schedule.total_steps)
    ray_env()
    env = trial_env(plan.folder, args.cpus_per_worker)
    spec = TrialSpec(space=space, overrides=overrides, steps=0, workers=workers, use_gpu=use_gpu,
                     cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     train_storage=str(plan.folder / "train_runs"), max_failures=1, env=env,
                     log_dir=str(plan.folder / "logs"), code_version=code_version(),
                     compile_cache=str(plan.folder / "compile_cache"))
    tracker = MlflowTracker(uri, EXPERIMENT, name, {"kind": "record attempt", "runs": len(seeds), "seeds": seeds,
                                                    "workers_per_trial": workers},
                            track, cfg.schedule.total_steps, spec.config_for)
    grid = execute(lambda: make_tuner(plan, spec, [ProgressPrinter(cfg.schedule.total_steps, "val_loss"), tracker]),
                   args.address, env)
    rows = tracker.annotate(rows_from_grid(grid, ["run.seed"]))
    tracker.finish_sweep(rows, tracker.curves())
    by_seed = {r["run.seed"]: r for r in rows}
    return [{"val_loss": by_seed[s]["val_loss"] if by_seed[s]["status"] == "finished" else float("nan"),
             "train_time_s": by_seed[s]["train_time_s"], "status": by_seed[s]["status"]} for s in seeds]


def run_with_torchrun(cfg, seeds, folder: Path, args) -> list[dict]:
    """Without Ray: `torchrun -m speedrun` once per seed, on this node's GPUs (or one CPU process)."""
    import torch
    nproc = args.workers_per_trial or max(1, torch.cuda.device_count())
    out = []
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        run_cfg = cfg.override({"run.seed": seed})
        cfg_file = folder / f"config_seed{seed}.json"
        cfg_file.write_text(json.dumps(run_cfg.to_dict()))
        result_file = folder / f"result_seed{seed}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "speedrun", "--config", str(cfg_file), "--json", str(result_file)]
        with open(folder / "logs" / f"seed{seed}.txt", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        r = json.loads(result_file.read_text()) if result_file.exists() else {}
        out.append({"val_loss": r.get("val_loss", float("nan")), "train_time_s": r.get("train_time_s", float("nan")),
                    "status": r.get("status", "failed")})
    return out


def log_verdict(uri: str, name: str, verdict) -> None:
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.sweep_name = '{name}' and tags.kind = 'sweep'")
    metrics = {"loss_mean": verdict.loss_mean, "loss_std": verdict.loss_std, "time_mean_s": verdict.time_mean,
               "time_std_s": verdict.time_std, "p_value": verdict.p_value}
    client.log_batch(parent.info.run_id,
                     metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v == v],
                     tags=[RunTag("accepted", str(verdict.accepted).lower()), RunTag("kind", "sweep"),
                           RunTag("attempt", "record"), RunTag("mlflow.runName", f"record attempt {name}"),
                           RunTag("runs_needed", str(verdict.runs_needed))])
    client.log_text(parent.info.run_id, verdict.table(), "verdict.md")


if __name__ == "__main__":
    sys.exit(main())
