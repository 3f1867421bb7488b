"""`python sweeps/calibrate.py --track tiny`: measure what the time objective and the record-curve pruner
need to know about a track, and print it as TOML for sweeps/tracks.toml.

- `noise`: the seed-to-seed standard deviation of the control's final validation loss at the step budget;
- `exchange_rate`: loss gained per 100 more steps near the end of the schedule (budget vs budget + delta,
  the whole schedule compressed to each length, averaged over the seeds);
- `curve`: the control's mean validation loss against the schedule fraction.
Runs `speedrun.train` in this process, one run after another (no Ray: nothing else competes for the cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python sweeps/calibrate.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=100, help="the step budget the track's sweeps use (default 100)")
    p.add_argument("--delta", type=int, default=30, help="extra steps for the exchange rate (default 30)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from speedrun.__main__ import build_config
    from speedrun.train import train

    finals: dict[int, list[float]] = {args.steps: [], args.steps + args.delta: []}
    curves: list[list[tuple[float, float]]] = []
    for steps in finals:
        for seed in range(args.seeds):
            cfg = build_config(args.preset, args.sets + [f"run.seed={seed}"], None, steps)
            result = train(cfg)
            finals[steps].append(result.val_loss)
            if steps == args.steps:
                curves.append([(h["step"] / steps, h["val_loss"]) for h in result.history])
            print(f"{steps} steps, seed {seed}: val_loss {result.val_loss:.4f} in {result.train_time_s:.1f}s",
                  file=sys.stderr)
    base, longer = (statistics.fmean(v) for v in finals.values())
    noise = statistics.stdev(finals[args.steps]) if args.seeds > 1 else float("nan")
    rate = 100.0 * (base - longer) / args.delta
    curve = [(f, statistics.fmean(c[i][1] for c in curves)) for i, (f, _) in enumerate(curves[0])]
    print(f"# {args.preset}, {args.seeds} seeds: final val loss {base:.4f} at {args.steps} steps, {longer:.4f} at "
          f"{args.steps + args.delta}")
    print(f"noise = {noise:.4f}")
    print(f"exchange_rate = {rate:.4f}")
    print(f"curve_steps = {args.steps}")
    print("curve = [" + ", ".join(f"[{f:.3f}, {v:.4f}]" for f, v in curve) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
