"""Where a GPU sweep's device time goes: a realistic sweep, then each trial's start-up and clocks, the sweep's
device-time split, and the training share of the trials that started after the first ones had compiled.

    python benchmarks/sweep_efficiency.py                 # 8 trials of a 300-step record schedule, 1 GPU each
    python benchmarks/sweep_efficiency.py --preset tiny --steps 30 --trials 3 --space muon_lr   # CPU smoke test
    python benchmarks/sweep_efficiency.py --reuse-workers   # trials in warm trainer processes (sweeps.trial_hosts)

The sweep is `sweeps.run` itself (Ray Tune, Ray Train, MLflow in a sqlite store under --work), `--scheduler none`
so every trial runs its whole schedule, over a space whose knobs recompile nothing (`muon_lr`: the trials share
their graphs through the sweep's compile cache). Data: for `record`, random GPT-2 token ids as FineWeb-format shards
(speed does not depend on them; the trials are "not comparable" with any track); other presets read their own. As many trials run at once as there are
GPUs (or CPU slots); the first of them compile, later ones find the graphs in the cache ("warm" below).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import random_shards  # noqa: E402

from speedrun import schedule as S  # noqa: E402
from speedrun.config import TrainConfig  # noqa: E402
from speedrun.prefix import vocab_for_speed  # noqa: E402
from sweeps.results import time_split  # noqa: E402

VAL_TOKENS = 1 << 19  # within random_shards' 1M-token validation shard


def sweep_command(args, work: Path, sets: dict) -> list[str]:
    cmd = [sys.executable, "-m", "sweeps.run", "--space", args.space, "--preset", args.preset, "--trials",
           str(args.trials), "--steps", str(args.steps), "--scheduler", "none", "--workers-per-trial", "1",
           "--storage", str(work / "sweeps"), "--name", args.name, "--tracking-uri", f"sqlite:///{work}/mlflow.db"]
    if args.preset == "record":
        cmd += ["--data", str(work / "data")]
    if args.reuse_workers:
        cmd += ["--reuse-workers"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def report(rows: list[dict], wall_s: float, slots: int) -> str:
    rows = sorted(rows, key=lambda r: r["trial_index"])
    get = lambda r, k: r.get(k) or 0.0  # noqa: E731
    lines = ["| trial | status | start-up s | worker start s | compile s | train s | val s | held s "
             "| training share |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        held = get(r, "time_total_s")
        seconds = " | ".join(f"{get(r, k):.1f}" for k in ("trial_startup_s", "worker_start_s", "compile_s",
                                                           "train_time_s", "val_time_s"))
        lines.append(f"| {r['trial_index']} | {r['status']} | {seconds} | {held:.1f} | "
                     f"{100 * get(r, 'train_time_s') / held if held else 0:.1f}% |")
    split = time_split(rows, wall_s, slots, workers=1)
    lines += ["", split.format("device")]
    warm = rows[slots:]  # the first `slots` trials start together on an empty cache; the rest find it filled
    if warm:
        held = sum(get(r, "time_total_s") for r in warm)
        starts = [get(r, "trial_startup_s") for r in warm]
        lines += ["", f"warm trials ({len(warm)}): start-up mean {statistics.mean(starts):.1f}s, max {max(starts):.1f}s; "
                      f"training {100 * sum(get(r, 'train_time_s') for r in warm) / held if held else 0:.1f}% "
                      f"of the device time they held"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="record")
    p.add_argument("--steps", type=int, default=300, help="each trial's whole schedule compressed to N steps")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--space", default="muon_lr")
    p.add_argument("--name", default="efficiency")
    p.add_argument("--work", default="/tmp/sweep-efficiency", help="data, sweep folder and MLflow store")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every trial")
    p.add_argument("--cpu-slots", type=int, default=2, help="trials at once on a machine without GPUs")
    p.add_argument("--reuse-workers", action="store_true", help="the sweep's --reuse-workers")
    args = p.parse_args(argv)
    import pyarrow.parquet as pq
    import torch

    work = Path(args.work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.resolve(args.preset, {}, args.steps)
    sets = {"data.val_tokens": VAL_TOKENS if args.preset == "record" else min(cfg.data.val_tokens, VAL_TOKENS)}
    vocab, note = vocab_for_speed(cfg.model.prefix_vocab, work)
    if vocab != cfg.model.prefix_vocab:
        sets["model.prefix_vocab"] = vocab
        print(f"# {note}", flush=True)
    sets.update(kv.split("=", 1) for kv in args.set)
    if args.preset == "record":  # the other presets read the sample corpus the project makes
        # twice the preset's schedule: room for warm-up steps and for --set shapes larger than the preset's
        need = 2 * sum(st.tokens_per_step * (st.end - st.start) for st in S.all_stages(cfg.schedule)) + (1 << 22)
        random_shards(work / "data", need, cfg.model.vocab_size, cfg.data.bos_id)
    slots = torch.cuda.device_count() or args.cpu_slots  # one trial per GPU, or per CPU slot without GPUs
    t0 = time.time()
    rc = subprocess.run(sweep_command(args, work, sets) + ["--concurrency", str(slots)], cwd=ROOT).returncode
    wall = time.time() - t0
    results = work / "sweeps" / args.name / "results.parquet"
    if not results.exists():
        print(f"sweep exit {rc}: no results at {results}")
        return 1
    print(f"\nsweep exit {rc} after {wall:.0f}s on {slots} slot(s)\n")
    print(report(pq.read_table(results).to_pylist(), wall, slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
