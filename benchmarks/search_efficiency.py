"""Compute spent and best time to target for {no pruning, ASHA, record-curve pruner} x sweep seeds.

    python benchmarks/search_efficiency.py                       # tiny track on CPU: 3 x 3 sweeps
    python benchmarks/search_efficiency.py --trials 6 --steps 60 --seeds 0 1 2 3

Every sweep searches the same space with the time-to-target objective and the same budget of trials; for
one sweep seed the searcher proposes the same configs under every scheduler (TPE's first trials are its
seeded random start-up), so the schedulers are compared on equal arms, one trial at a time. Compute = trial-seconds: the wall
time each trial held its workers (Tune's time_total_s, start-up included). One local Ray serves all sweeps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path



def run_one(scheduler: str, seed: int, args, root: Path) -> dict:
    import pyarrow.parquet as pq

    from sweeps import run as sweep_cli

    name = f"{scheduler}-seed{seed}"
    argv = ["--space", args.space, "--preset", "tiny", "--trials", str(args.trials), "--steps", str(args.steps),
            "--objective", "time", "--scheduler", scheduler, "--seed", str(seed), "--name", name,
            "--storage", str(root / "sweeps"), "--tracking-uri", f"sqlite:///{root}/mlflow.db",
            "--concurrency", "1", "--set", "run.warmup_steps=0"]
    t0 = time.time()
    rc = sweep_cli.main(argv)
    if rc != 0:
        raise SystemExit(f"sweep {name} exited with {rc}")
    rows = pq.read_table(root / "sweeps" / name / "results.parquet").to_pylist()
    finished = [r for r in rows if r["status"] == "finished" and r["objective_time_s"] is not None]
    best = min(finished, key=lambda r: r["objective_time_s"])
    return {"scheduler": scheduler, "seed": seed, "wall_s": time.time() - t0,
            "trial_seconds": sum(r["time_total_s"] or 0.0 for r in rows),
            "training_seconds": sum(r["train_time_s"] or 0.0 for r in rows),
            "pruned": sum(r["status"] == "pruned" for r in rows), "trials": len(rows),
            "best_time_to_target_s": best["objective_time_s"], "best_reached": best["time_to_target_s"] is not None,
            "best_trial": best["trial_index"]}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:8.1f} ± {sd:5.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=str(Path(__file__).resolve().parent / "spaces" / "wide_lr.toml"))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schedulers", nargs="+", default=["none", "asha", "curve"])
    p.add_argument("--out", help="also write the per-sweep results as JSON here")
    args = p.parse_args(argv)

    import ray

    from sweeps.cluster import local_ray_options, ray_env

    ray_env()
    # one Ray for every sweep, started as the sweep CLI starts its own (headroom for a leaked reservation)
    ray.init(log_to_driver=False, logging_level="WARNING", **local_ray_options())
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                for scheduler in args.schedulers:
                    results.append(run_one(scheduler, seed, args, Path(tmp)))
                    r = results[-1]
                    print(f"# {scheduler:5s} seed {seed}: {r['trial_seconds']:.0f} trial-s, {r['pruned']} pruned, "
                          f"best time to target {r['best_time_to_target_s']:.1f}s (trial {r['best_trial']})",
                          file=sys.stderr)
    finally:
        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))

    none = [r["trial_seconds"] for r in results if r["scheduler"] == "none"]
    print(f"\nsearch efficiency: space {args.space}, tiny track, {args.trials} trials of {args.steps} steps, "
          f"objective time to target, sweep seeds {args.seeds}")
    print(f"{'scheduler':>9}  {'trial-seconds':>16}  {'vs none':>7}  {'training s':>16}  {'pruned':>6}  "
          f"{'best time to target (s)':>23}")
    for scheduler in args.schedulers:
        rs = [r for r in results if r["scheduler"] == scheduler]
        ratio = statistics.fmean(r["trial_seconds"] for r in rs) / statistics.fmean(none) if none else float("nan")
        print(f"{scheduler:>9}  {spread([r['trial_seconds'] for r in rs]):>16}  {ratio:>7.2f}  "
              f"{spread([r['training_seconds'] for r in rs]):>16}  {statistics.fmean(r['pruned'] for r in rs):>6.1f}  "
              f"{spread([r['best_time_to_target_s'] for r in rs]):>23}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
