"""`python -m speedrun --preset tiny [--set key=value ...] [--data DIR] [--steps N]`: one training run.

Prints the speedrun's log lines and a summary. Runs under torchrun as one rank of a group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import TrainConfig, parse_overrides
from .data import ShardError
from .prefix import VocabularyMissing
from .train import train


def build_config(preset: str, sets: list[str], data: str | None, steps: int | None,
                 config_file: str | None = None) -> TrainConfig:
    base = None
    if config_file:
        try:
            base = TrainConfig.from_dict(json.loads(open(config_file).read()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {config_file}: {e}") from None
    overrides = parse_overrides(sets)
    if data:
        overrides["data.data_dir"] = data
    return TrainConfig.resolve(preset, overrides, steps, base=base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speedrun", description="Train the speedrun model once.")
    p.add_argument("--preset", default="tiny", help="record | tiny | record-sample | public-2508 (default: tiny)")
    p.add_argument("--config", help="a JSON file of flat dotted keys (replaces --preset), e.g. a trial's config.json")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config knob, e.g. --set optim.muon_lr=0.03 (repeatable)")
    p.add_argument("--data", help="folder with the .bin shards (default: the preset's)")
    p.add_argument("--steps", type=int, help="compress the whole schedule into N steps")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--json", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    try:
        cfg = build_config(args.preset, args.sets, args.data, args.steps, args.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        result = train(cfg, log=lambda line: print(line, flush=True))
    except (ShardError, VocabularyMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints the summary
        floor = f" (corpus floor {result.floor:.4f})" if result.floor is not None else ""
        ttt = f"{result.time_to_target_s:.2f}s" if result.time_to_target_s is not None else "not reached"
        print(f"{result.status}: val_loss {result.val_loss:.4f}{floor} | train_time {result.train_time_s:.2f}s "
              f"| steps {result.steps} | tokens {result.tokens:,} | time_to_target({cfg.run.target_loss}) {ttt} "
              f"| warm-up {result.compile_s:.1f}s | peak_mem {result.peak_mem_bytes / 2**20:.0f} MiB")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({k: v for k, v in vars(result).items()}, f, indent=1)
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
