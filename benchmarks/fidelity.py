"""Fidelity of the `public-2508` preset to the public trainer file it reproduces: both trained on the same
learnable shards, side by side on two GPUs, two seeds each; prints both validation curves, each trainer's
seed-to-seed spread, the largest gap between the two means in units of that spread, and tokens/s of both.

    python benchmarks/fidelity.py --public ../shared/reference/public_train_gpt.py --steps 200 --seeds 1 2
    python benchmarks/fidelity.py --public ... --seeds 1 2 --gpus 0 1 2 3    # 4 GPUs: both seeds at once
    python benchmarks/fidelity.py --table --out fidelity_runs        # the table of what --out holds

The shards: the generated sample corpus (speedrun.sample, a Markov mixture whose loss floor is known) with its
127 symbols mapped to GPT-2 token ids and its BOS to 50256, under FineWeb's file names, so the public file reads
them unchanged. The public file runs as `run.sh` runs it (torchrun, one process; NUM_ITERS, VAL_EVERY,
VAL_TOKENS) from a copy with one line added before its model is built, `torch.manual_seed(int(SEED))`: it seeds
nothing itself. Ours: `python -m speedrun --preset public-2508 --steps N` with the file's momentum warm-up of 300
steps (the file keeps it when NUM_ITERS shortens the run; --steps would scale it). Each trainer runs its seeds one
after another on its own GPU, both trainers at once. Runs accumulate in --out (a later call adds seeds, and warm
Inductor caches there shorten its compiles); the table covers every run there.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from speedrun.data import write_shard  # noqa: E402
from speedrun.sample import MarkovMixture, SampleSpec  # noqa: E402

GPT2_BOS = 50256
TOKENS_PER_STEP = 393_216  # the public file's 8 x 49,152 (grad accumulation 8 on one GPU)
VAL_WINDOW = 8 * 262_144  # what the public file's validation loader keeps ahead of its position on one GPU


def gpt2_ids(symbols: np.ndarray, spec: SampleSpec) -> np.ndarray:
    """The sample corpus's symbols as distinct GPT-2 token ids (1000 + 311 s), its BOS as 50256."""
    ids = 1000 + 311 * symbols.astype(np.int64)
    return np.where(symbols == spec.bos_id, GPT2_BOS, ids).astype(np.uint16)


def write_fidelity_shards(folder: Path, train_tokens: int, val_tokens: int, shard_tokens: int = 100_000_000) -> Path:
    """fineweb_train_00000k.bin and fineweb_val_000000.bin in `folder` (made once; reused when big enough)."""
    meta = folder / "fidelity.json"
    if meta.exists() and json.loads(meta.read_text())["train_tokens"] >= train_tokens:
        return folder
    spec = SampleSpec()
    source = MarkovMixture(spec)
    rng = np.random.default_rng(spec.seed + 1)
    train = gpt2_ids(source.generate(train_tokens, rng, lanes=4096)[:train_tokens], spec)
    for k, start in enumerate(range(0, train.size, shard_tokens)):
        write_shard(folder / f"fineweb_train_{k + 1:06d}.bin", train[start : start + shard_tokens])
    # the public file's loader refills once fewer than 8 x 262,144 (+1) tokens remain ahead of it: a margin beyond them
    n_val = val_tokens + 2 * VAL_WINDOW + 1
    val = gpt2_ids(source.generate(n_val, np.random.default_rng(spec.seed + 2), lanes=4096)[:n_val], spec)
    write_shard(folder / "fineweb_val_000000.bin", val)
    meta.write_text(json.dumps({"train_tokens": int(train.size), "val_tokens": int(val.size)}))
    return folder


def builds_gpt(value: ast.expr | None) -> bool:
    """Whether an assigned value is `GPT(...)`, or a method chain on it (`GPT(...).cuda()`)."""
    node = value
    while isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            return node.func.id == "GPT"
        if not isinstance(node.func, ast.Attribute):
            return False
        node = node.func.value
    return False


def seeded_copy(source: str) -> str:
    """The public file with `torch.manual_seed(int(os.environ.get("SEED", "0")))` before the module-level statement
    that builds its model (an assignment of GPT(...)), found by parsing the file."""
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and builds_gpt(stmt.value):
            lines = source.splitlines(keepends=True)
            seed = 'import os as _os, torch as _torch; _torch.manual_seed(int(_os.environ.get("SEED", "0")))\n'
            return "".join(lines[: stmt.lineno - 1] + [seed] + lines[stmt.lineno - 1 :])
    raise ValueError("no module-level `... = GPT(...)` statement: cannot seed this file")


def run_public(public: Path, data: Path, out: Path, seed: int, args, env: dict) -> Path:
    work = out / f"public_work_seed{seed}"  # its own folder: seeds may run at once on several GPUs
    (work / "data").mkdir(parents=True, exist_ok=True)
    link = work / "data" / "fineweb10B"
    if not link.exists():
        link.symlink_to(data.resolve())
    (work / "train_gpt.py").write_text(seeded_copy(public.read_text()))
    log = out / f"public_seed{seed}.txt"
    run_env = {**env, "NUM_ITERS": str(args.steps), "VAL_EVERY": str(args.val_every), "VAL_TOKENS": str(args.val_tokens),
               "SEED": str(seed), "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_public")}
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        "train_gpt.py"], cwd=work, env=run_env, stdout=f, stderr=subprocess.STDOUT, check=False)
    return log


def run_ours(data: Path, out: Path, seed: int, args, env: dict) -> Path:
    log = out / f"ours_seed{seed}.txt"
    sets = {"run.seed": seed, "run.val_every": args.val_every, "data.val_tokens": args.val_tokens,
            "optim.muon_momentum_warmup_steps": 300}
    cmd = [sys.executable, "-m", "speedrun", "--preset", "public-2508", "--steps", str(args.steps), "--data", str(data)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env={**env, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_ours")}, stdout=f,
                       stderr=subprocess.STDOUT, check=False)
    return log


def run_side_by_side(args) -> None:
    import torch
    if torch.cuda.device_count() < len(args.gpus):
        sys.exit(f"error: --gpus names {len(args.gpus)} GPUs and this machine has {torch.cuda.device_count()}: "
                 "run on a machine with that many (nvidia-h200-x2 for two), or name fewer")
    out = Path(args.out).resolve()
    # the loader aligns each sequence to a BOS, skipping up to a document per sequence, and keeps a window ahead
    write_fidelity_shards(out / "shards", int((args.steps + 4) * TOKENS_PER_STEP * 1.1), args.val_tokens)
    jobs = []
    for trainer, gpu, seeds in lanes(args.gpus, args.seeds):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, __file__, "--worker", trainer, "--public", str(Path(args.public).resolve()),
                "--steps", str(args.steps), "--val-every", str(args.val_every), "--val-tokens", str(args.val_tokens),
                "--out", str(out), "--seeds", *map(str, seeds)]
        jobs.append(subprocess.Popen(argv, env=env))
    t0 = time.time()
    for job in jobs:
        job.wait()
    print(f"both trainers done in {time.time() - t0:.0f}s")


def lanes(gpus: list[int], seeds: list[int]) -> list[tuple[str, int, list[int]]]:
    """(trainer, GPU, its seeds in order) per process: the first half of `gpus` run the public file, the second
    half ours; lane i takes seeds i, i+k, ... (k lanes per trainer), so seed s of both trainers runs at once."""
    k = len(gpus) // 2
    return [(trainer, gpus[t * k + i], seeds[i::k]) for t, trainer in enumerate(("public", "ours")) for i in range(k)
            if seeds[i::k]]


def seeds_of(trainer: str, args) -> None:
    """One trainer's seeds, one after another (the child process on that trainer's GPU)."""
    out = Path(args.out).resolve()
    for seed in args.seeds:
        t0 = time.time()
        if trainer == "public":
            log = run_public(Path(args.public), out / "shards", out, seed, args, dict(os.environ))
        else:
            log = run_ours(out / "shards", out, seed, args, dict(os.environ))
        print(f"{trainer} seed {seed}: {time.time() - t0:.0f}s, log {log}", flush=True)


def curves(out: Path) -> dict[str, dict[int, dict[int, tuple[float, float]]]]:
    """trainer -> seed -> step -> (val_loss, train_time_s), from every log in `out`."""
    from sweeps.speedrun_logs import LogError, parse_log

    found: dict = {"public": {}, "ours": {}}
    for log in sorted(out.glob("*_seed*.txt")):
        trainer, seed = log.stem.split("_seed")
        try:
            run = parse_log(log)
        except LogError:
            print(f"note: {log.name} has no validation line (a run that failed: see the log)")
            continue
        found.setdefault(trainer, {})[int(seed)] = {step: (loss, t) for step, loss, t in run.history}
    return found


def table(out: Path) -> str:
    runs = curves(out)
    pub, ours = runs.get("public", {}), runs.get("ours", {})
    if not pub or not ours:
        return "no runs of both trainers in " + str(out)
    steps = sorted(set.intersection(*(set(c) for c in [*pub.values(), *ours.values()])))
    lines = [f"public: seeds {sorted(pub)}; ours (public-2508): seeds {sorted(ours)}", "",
             f"{'step':>6}  {'public mean':>11}  {'± std':>7}  {'ours mean':>9}  {'± std':>7}  {'gap':>7}  {'gap/spread':>10}"]
    worst = 0.0
    for step in steps:
        p = [c[step][0] for c in pub.values()]
        o = [c[step][0] for c in ours.values()]
        sp = statistics.stdev(p) if len(p) > 1 else float("nan")
        so = statistics.stdev(o) if len(o) > 1 else float("nan")
        spread = max(sp, so)
        gap = abs(statistics.mean(p) - statistics.mean(o))
        units = gap / spread if spread > 0 else float("inf")
        if step > 0:
            worst = max(worst, units)
        lines.append(f"{step:>6}  {statistics.mean(p):>11.4f}  {sp:>7.4f}  {statistics.mean(o):>9.4f}  {so:>7.4f}  "
                     f"{gap:>7.4f}  {units:>10.2f}")
    lines.append(f"\nlargest gap after step 0: {worst:.2f} seed-spreads (spread: the larger of the two trainers' "
                 "standard deviations over seeds)")
    for name, runs_ in (("public", pub), ("ours", ours)):
        rates = [step * TOKENS_PER_STEP / t for c in runs_.values() for step, (_, t) in [max(c.items())] if t > 0]
        if rates:
            lines.append(f"{name:>6}: {statistics.mean(rates) / 1e3:.1f}k tokens/s (train time of the whole run, "
                         f"{len(rates)} runs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--public", help="the public trainer file (../shared/reference/public_train_gpt.py)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-tokens", type=int, default=1_048_576, help="a multiple of 262,144 (the file's val rows)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gpus", type=int, nargs="+", default=[0, 1],
                   help="k GPUs for the public file, then k for ours (k seeds at once); default 0 1: one each, "
                        "the seeds one after another")
    p.add_argument("--out", default="fidelity_runs")
    p.add_argument("--table", action="store_true", help="only print the table of the runs in --out")
    p.add_argument("--worker", choices=["public", "ours"], help=argparse.SUPPRESS)  # one GPU's child process
    args = p.parse_args(argv)
    if args.worker:
        seeds_of(args.worker, args)
        return 0
    if not args.table:
        if not args.public or not Path(args.public).is_file():
            p.error("--public PATH: the public trainer file to compare with")
        if len(args.gpus) % 2 or len(set(args.gpus)) != len(args.gpus):
            p.error("--gpus: as many distinct GPUs for the public file as for ours (0 1, or 0 1 2 3)")
        if args.val_tokens % 262_144:
            p.error("--val-tokens must be a multiple of 262,144 (the public file's validation rows)")
        run_side_by_side(args)
    print(table(Path(args.out).resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
