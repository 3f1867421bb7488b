"""Does a trial of a contributor's own train_gpt.py train as fast as the file run plainly? A sweep of the file
(`--trainer`, one GPU per trial, the trials side by side) and plain `run.sh` runs of the same file (one per GPU,
side by side), all on one Inductor cache, then a table: tokens/s of each run from its last validation line, each
trial's ratio to the plain runs' mean, and each trial's start-up and training time.

    python benchmarks/script_vs_plain.py --phase warm      # plain runs, cold: they fill the shared compile cache
    python benchmarks/script_vs_plain.py --phase measure   # the sweep, then plain runs again, warm; the table
    python benchmarks/script_vs_plain.py --table           # the table of what --work holds

Two phases because a cold compile of the public file takes ~400 s and the device's calls are 10 minutes long;
the work folder (default /tmp/script-vs-plain, outside the checkout) stays on the machine between calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENS_PER_STEP = 393_216  # the public file's 8 x 49,152 per step (grad accumulation on one GPU, or 8 GPUs)
SWEEP = "pub"


def plain_runs(args, work: Path, tag: str) -> None:
    """`run.sh` once per GPU, side by side, each in its own folder, sharing the sweep's compile cache."""
    jobs = []
    for gpu in range(args.gpus):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "NUM_ITERS": str(args.iters), "VAL_EVERY": "0",
               "WORK": str(work / f"plain_{gpu}"), "DATA": str(shards(work, args.run_sh)), **cache_env(work)}
        log = open(work / f"plain_{tag}_gpu{gpu}.txt", "w")
        jobs.append((subprocess.Popen(["bash", args.run_sh], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for job, log in jobs:
        job.wait()
        log.close()


def shards(work: Path, run_sh: str) -> Path:
    """run.sh's random-token shards (its random_shards.py beside it), made once and shared by every run."""
    folder = work / "data"
    if not (folder / "fineweb_val_000000.bin").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(Path(run_sh).parent / "random_shards.py"), str(folder)], check=True)
    return folder


def data_root(work: Path, run_sh: str) -> Path:
    """A folder laid out as the file expects under DATA_PATH (data/fineweb10B/), linked to the shared shards, so
    the sweep needs no plain run before it."""
    root = work / "sweep_data"
    link = root / "data" / "fineweb10B"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shards(work, run_sh).resolve())
    return root


def cache_env(work: Path) -> dict:
    folder = work / "sweeps" / SWEEP / "inductor_cache"  # the sweep's own cache folder (cluster.trial_env)
    folder.mkdir(parents=True, exist_ok=True)
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder), "TRITON_CACHE_DIR": str(folder / "triton")}


def sweep(args, work: Path) -> int:
    space = work / "muon_lr.toml"  # trial 0 is the file as it is (the control), trial 1 another Muon lr
    space.write_text('description = "the file\'s Muon learning rate"\n[defaults]\ntrials = 2\n'
                     '[params."Muon.lr"]\ntype = "float"\nlow = 0.02\nhigh = 0.1\nlog = true\n')
    cmd = [sys.executable, "-m", "sweeps.run", "--trainer", args.trainer, "--space", str(space), "--trials", "2",
           "--workers-per-trial", "1", "--scheduler", "none", "--storage", str(work / "sweeps"), "--name", SWEEP,
           "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--env", f"NUM_ITERS={args.iters}", "--env", "VAL_EVERY=0",
           "--env", "VAL_TOKENS=1048576",  # as run.sh sets it: the file's default is more than the shards' 4M
           "--env", f"DATA_PATH={data_root(work, args.run_sh)}"]
    with open(work / "sweep.log", "w") as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def rate(steps: int, seconds: float) -> float:
    return steps * TOKENS_PER_STEP / seconds


def table(work: Path) -> str:
    import pyarrow.parquet as pq

    from sweeps.speedrun_logs import LogError, parse_log

    rows, plain = [], []
    for log in sorted(work.glob("plain_*_gpu*.txt")):
        try:
            run = parse_log(log)
        except LogError:
            rows.append(f"| {log.stem} | no validation line | | | | |")
            continue
        tps = rate(run.final_step, run.train_time_s)
        if "measure" in log.stem:  # the warm plain runs the trials are compared with (same call, same cache)
            plain.append(tps)
        rows.append(f"| {log.stem} | {run.final_step} | {run.train_time_s:.1f} | {tps / 1e3:.1f}k | | |")
    results = work / "sweeps" / SWEEP / "results.parquet"
    base = statistics.mean(plain) if plain else float("nan")
    if results.exists():
        for r in pq.read_table(results).to_pylist():
            tps = rate(int(r["step"]), r["train_time_s"])
            rows.append(f"| trial {r['trial_index']} ({r['status']}) | {int(r['step'])} | {r['train_time_s']:.1f} | "
                        f"{tps / 1e3:.1f}k | {tps / base:.3f} | {r.get('trial_startup_s') or float('nan'):.1f} |")
    head = ["| run | steps | train s | tokens/s | / plain (measure) | start-up s |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["warm", "measure", "sweep"], help="sweep: the sweep alone (its cold compile)")
    p.add_argument("--table", action="store_true")
    p.add_argument("--trainer", default=str(ROOT / ".ref" / "public_train_gpt.py"),
                   help="the file to sweep (a copy of ../shared/reference/public_train_gpt.py by default)")
    p.add_argument("--run-sh", default=str(ROOT / ".ref" / "run.sh"), help="the script that runs it plainly")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--work", default="/tmp/script-vs-plain")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.phase == "warm":
        plain_runs(args, work, "warm")
    elif args.phase in ("measure", "sweep"):
        rc = sweep(args, work)
        print(f"sweep exit {rc} after {time.time() - t0:.0f}s", flush=True)
        if args.phase == "measure":
            plain_runs(args, work, "measure")
    if args.phase:
        print(f"phase {args.phase}: {time.time() - t0:.0f}s")
    print(table(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
