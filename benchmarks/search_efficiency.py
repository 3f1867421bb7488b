"""How fast a sweep finds good configs: best objective reached per trial-second, for samplers or schedulers.

    python benchmarks/search_efficiency.py --compare samplers --jobs 12 --cpus 16   # the README's sampler table
    python benchmarks/search_efficiency.py --compare schedulers               # none / ASHA / curve pruner
    python benchmarks/search_efficiency.py --compare samplers --trials 8 --seeds 0 1 --jobs 2   # a 2-core try

Every arm is a real sweep (`sweeps/run.py`, tiny preset on CPU workers, the wide learning-rate space) with the
same budget of trials, one trial at a time, for each sweep seed. The sweeps run as separate drivers on one
Ray cluster started here, `--jobs` of them at once (each with its own trials, so arms share the machine's
load alike). Compute = trial-seconds: the wall time each trial held its worker (Tune's time_total_s, start-up
included), summed in trial order. The table gives the best objective each arm had reached within the same
trial-second budgets (a quarter, half and all of the smallest total any sweep spent), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_PY = HERE.parent / "sweeps" / "run.py"
ARMS = {"samplers": ("tpe", "gp", "cmaes", "random"), "schedulers": ("none", "asha", "curve")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_argv(compare: str, arm: str, seed: int, args, root: Path, address: str) -> list[str]:
    argv = [sys.executable, str(RUN_PY), "--space", args.space, "--preset", "tiny", "--trials", str(args.trials),
            "--steps", str(args.steps), "--objective", args.objective, "--seed", str(seed),
            "--name", f"{arm}-seed{seed}", "--storage", str(root / "sweeps"),
            "--tracking-uri", f"sqlite:///{root}/mlflow-{arm}-{seed}.db", "--concurrency", "1",
            "--cpus-per-worker", "1", "--address", address, "--set", "run.warmup_steps=0"]
    for kv in args.sets:
        argv += ["--set", kv]
    if compare == "samplers":
        argv += ["--sampler", arm, "--scheduler", args.scheduler]
    else:
        argv += ["--scheduler", arm, "--sampler", args.sampler]
    return argv


def sweep_record(arm: str, seed: int, folder: Path, objective_key: str) -> dict:
    import pyarrow.parquet as pq

    rows = sorted(pq.read_table(folder / "results.parquet").to_pylist(), key=lambda r: r["trial_index"])
    spent, best, curve = 0.0, math.inf, []
    for r in rows:  # one trial at a time: trial order is time order
        spent += r["time_total_s"] or 0.0
        value = r.get(objective_key)
        if r["status"] == "finished" and value is not None and math.isfinite(value):
            best = min(best, value)
        curve.append((spent, best))
    return {"arm": arm, "seed": seed, "curve": curve, "trial_seconds": spent, "best": best,
            "pruned": sum(r["status"] == "pruned" for r in rows), "trials": len(rows),
            "training_seconds": sum(r["train_time_s"] or 0.0 for r in rows)}


def best_within(curve: list[tuple[float, float]], budget: float) -> float:
    reached = [best for spent, best in curve if spent <= budget]
    return reached[-1] if reached else math.inf


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"{'none yet':>15}" if not finite else f"{statistics.fmean(finite):.4f} ({len(finite)}/{len(values)})"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def run_all(args, root: Path) -> list[dict]:
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]  # wherever Ray was installed to
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    port = free_port()
    cpus = args.cpus or os.cpu_count()
    subprocess.run([*ray_cli, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=300)
    pending = [(arm, seed) for seed in args.seeds for arm in args.arms]
    running: dict[tuple, tuple] = {}
    records = []
    objective_key = {"loss": "val_loss", "time": "objective_time_s"}[args.objective]
    t0 = last_note = time.time()
    try:
        while pending or running:
            if time.time() - last_note > 60:  # progress on long work: trials ended per running sweep
                last_note = time.time()
                ended = {f"{a}-{sd}": Path(log.name).read_text().count(" trials ended")
                         for (a, sd), (_, log) in running.items()}
                print(f"[{time.time() - t0:6.0f}s] trials ended so far: {ended}", file=sys.stderr)
            while pending and len(running) < args.jobs:
                arm, seed = pending.pop(0)
                log = open(root / f"{arm}-seed{seed}.log", "w")
                proc = subprocess.Popen(sweep_argv(args.compare, arm, seed, args, root, f"127.0.0.1:{port}"),
                                        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
                running[(arm, seed)] = (proc, log)
            time.sleep(2)
            for key, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[key]
                if proc.returncode != 0:
                    tail = Path(log.name).read_text()[-3000:]
                    raise SystemExit(f"sweep {key} exited with {proc.returncode}:\n{tail}")
                records.append(sweep_record(*key, root / "sweeps" / f"{key[0]}-seed{key[1]}", objective_key))
                if args.out:  # as they come: a run cut short keeps the sweeps it finished
                    Path(args.out).write_text(json.dumps(records, indent=1))
                r = records[-1]
                print(f"[{time.time() - t0:6.0f}s] {key[0]} seed {key[1]}: best {r['best']:.4f} in "
                      f"{r['trial_seconds']:.0f} trial-s, {r['pruned']} pruned", file=sys.stderr)
    finally:
        for proc, log in running.values():
            proc.kill()
        subprocess.run([*ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=300)
    return records


def table(records: list[dict], args) -> str:
    horizon = min(r["trial_seconds"] for r in records)
    budgets = [horizon / 4, horizon / 2, horizon]
    lines = [f"search efficiency ({args.compare}): space {Path(args.space).stem}, tiny preset, {args.trials} trials of "
             f"{args.steps} steps, one at a time, objective {args.objective} (lower is better), seeds {args.seeds}",
             f"best objective reached within the first {budgets[0]:.0f} / {budgets[1]:.0f} / {budgets[2]:.0f} "
             f"trial-seconds (mean ± std over seeds) and at the end of the sweep",
             f"{'arm':>7}  {'@ ' + format(budgets[0], '.0f') + ' s':>17}  {'@ ' + format(budgets[1], '.0f') + ' s':>17}  "
             f"{'@ ' + format(budgets[2], '.0f') + ' s':>17}  {'at the end':>17}  {'trial-s':>7}  {'pruned':>6}"]
    for arm in args.arms:
        rs = [r for r in records if r["arm"] == arm]
        cells = [spread([best_within(r["curve"], b) for r in rs]) for b in budgets]
        lines.append(f"{arm:>7}  {cells[0]:>17}  {cells[1]:>17}  {cells[2]:>17}  {spread([r['best'] for r in rs]):>17}  "
                     f"{statistics.fmean(r['trial_seconds'] for r in rs):7.0f}  "
                     f"{statistics.fmean(r['pruned'] for r in rs):6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=sorted(ARMS), default="samplers")
    p.add_argument("--arms", nargs="+", help="default: every sampler (or scheduler)")
    p.add_argument("--space", default=str(HERE / "spaces" / "wide_lr.toml"))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--objective", choices=["loss", "time"], default="loss",
                   help="time needs --steps 100 (the tiny track's budget)")
    p.add_argument("--scheduler", default="asha", help="with --compare samplers (default asha, a sweep's default)")
    p.add_argument("--sampler", default="tpe", help="with --compare schedulers")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="fixed value for every trial, as in sweeps/run.py (default: data.val_tokens=8192)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="sweeps at once on the one Ray cluster (default 1)")
    p.add_argument("--cpus", type=int, help="CPUs the Ray cluster offers (default: the machine's)")
    p.add_argument("--out", help="also write every sweep's record as JSON here")
    p.add_argument("--root", help="keep the sweeps, their MLflow stores and driver logs in this folder "
                   "(default: a temporary one)")
    args = p.parse_args(argv)
    args.arms = args.arms or list(ARMS[args.compare])
    args.sets = args.sets if args.sets is not None else ["data.val_tokens=8192"]
    if args.root:
        Path(args.root).mkdir(parents=True, exist_ok=True)
        records = run_all(args, Path(args.root).resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            records = run_all(args, Path(tmp))
    print(table(records, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
