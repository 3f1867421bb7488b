"""Where a config's training loss stops being finite, and on which path: the same steps under several variants.

    python benchmarks/loss_probe.py --steps 40 --probe 8 --set schedule.tokens_per_step=[393216]*4 \
        --variant eager --variant eager:model.prefix_vocab= --variant compiled --variant compiled+warmup

Each variant is a fresh trainer (`_Trainer`, seeded: every variant starts from the same weights and reads the
same batches) of `--preset` compressed to `--steps`, with the `--set`s, then the variant's own sets
(`NAME:key=value,key=value`; NAME `eager` or `compiled` picks run.compile). A variant named `...+warmup` first
runs the trainer's warm-up (every stage shape, then the reset); the others start at once. It then runs --probe
optimiser steps from step 0 and prints each step's training loss. A variant named `...+run` runs the trainer's
own loop instead (`_Trainer.run`: warm-up, validation at step 0 and every run.val_every steps, the whole
schedule), exactly as `python -m speedrun` and every sweep trial do, with a training-loss line every step.
Data: random GPT-2 ids as FineWeb-format shards (benchmarks/throughput.py), as the GPU benchmarks use. The table's columns are variants, its rows steps; the last line names each variant's first non-finite step.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import random_shards  # noqa: E402

from speedrun import schedule as S  # noqa: E402
from speedrun.config import TrainConfig  # noqa: E402
from speedrun.prefix import vocab_for_speed  # noqa: E402
from speedrun.train import _Trainer  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict[str, str], str]:
    """`compiled+warmup:model.fused_mlp=false,model.prefix_vocab=` -> (label, sets, mode: "", "warmup" or "run")."""
    name, _, rest = spec.partition(":")
    base, _, extra = name.partition("+")
    if base not in ("eager", "compiled") or extra not in ("", "warmup", "run"):
        raise SystemExit(f"--variant {spec}: expected eager|compiled[+warmup|+run][:key=value,...]")
    sets = {"run.compile": str(base == "compiled").lower()}
    if extra == "run":
        sets["run.log_every"] = "1"
    sets.update(kv.split("=", 1) for kv in rest.split(",") if kv)
    return spec, sets, extra


def probe(cfg: TrainConfig, steps: int, mode: str) -> tuple[list[float], float]:
    """Training losses of steps 0..steps-1 (and the set-up seconds, warm-up included)."""
    t0 = time.perf_counter()
    losses: list[float] = []
    log = lambda line: print("  " + line, flush=True)  # noqa: E731
    report = lambda m: losses.append(m["train_loss"]) if "train_loss" in m and len(losses) < steps else None  # noqa: E731
    trainer = _Trainer(cfg, report=report if mode == "run" else None, log=log)
    if mode == "run":
        result = trainer.run()
        print(f"  {result.status} after {result.steps} steps, final val_loss {result.val_loss:.4f}", flush=True)
        setup = result.startup_s
    else:
        if mode == "warmup":
            trainer.warmup()
        setup = time.perf_counter() - t0
        for step in range(steps):
            losses.append(trainer.train_step(step).item())
            print(f"  step {step}: {losses[-1]:.4f}", flush=True)
    trainer.dist.close()
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return losses, setup


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="record")
    ap.add_argument("--steps", type=int, default=0, help="compress the preset's schedule to this many steps")
    ap.add_argument("--probe", type=int, default=8, help="optimiser steps to run per variant")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every variant")
    ap.add_argument("--variant", action="append", default=[], help="eager|compiled[+warmup|+run][:key=value,...]")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["eager", "compiled"])]

    work = Path(tempfile.mkdtemp(prefix="speedrun-probe-"))
    common = {"data.data_dir": str(work), "data.val_tokens": 65536, "data.source": "fineweb"}
    if args.preset != "record":
        common["data.bos_id"] = "127"
    common.update(kv.split("=", 1) for kv in args.set)
    cfg = TrainConfig.resolve(args.preset, common, args.steps or None)
    vocab, note = vocab_for_speed(cfg.model.prefix_vocab, work)
    if note:
        print(f"# {note}", flush=True)
    common["model.prefix_vocab"] = vocab
    cfg = TrainConfig.resolve(args.preset, common, args.steps or None)
    per_pass = sum(st.tokens_per_step for st in S.all_stages(cfg.schedule))
    need = max(st.tokens_per_step for st in S.all_stages(cfg.schedule)) * args.probe + 4 * per_pass + (1 << 22)
    random_shards(work, need, cfg.model.vocab_size, cfg.data.bos_id)

    results = {}
    for label, sets, mode in variants:
        print(f"# {label}", flush=True)
        try:
            results[label] = probe(cfg.override(sets), args.probe, mode)
        except Exception as e:  # one variant's failure is a finding, not the end of the probe
            print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
            results[label] = ([], float("nan"))

    labels = list(results)
    print("\n| step | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for step in range(args.probe):
        cells = [f"{r[0][step]:.4f}" if step < len(r[0]) else "-" for r in results.values()]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print("| set-up s | " + " | ".join(f"{r[1]:.1f}" for r in results.values()) + " |")
    firsts = {k: next((i for i, x in enumerate(r[0]) if not math.isfinite(x)), None) for k, r in results.items()}
    print("\nfirst non-finite step: " + ", ".join(f"{k}: {'none' if v is None else v}" for k, v in firsts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
