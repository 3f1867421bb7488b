"""`python sweeps/calibrate.py --preset tiny --steps 100 --name tiny`: measure a track and print it as TOML
for sweeps/tracks.toml.

Runs the preset's control `--seeds` times at the step budget, in this process, one run after another
(no Ray: nothing else competes for the device), and prints what the track binds and what it holds:
- what it was measured on: data source, validation shards and token count, their sha256, the step budget;
- `record_time_s`, `time_noise`, `record_runs`: the mean, standard deviation and count of the runs'
  end-of-run training times (a run's time, sweeps/records.py); `hardware`: where;
- `noise`: the seed-to-seed standard deviation of the final validation loss; `target_loss`: `--target`, or
  the mean final loss plus three of those, rounded up (the control reaches it in nearly every run);
- `exchange_rate` (with `--delta D`): loss gained per 100 more steps near the end (budget vs budget + D);
- `curve`: the control's mean validation loss against the schedule fraction, for the record-curve pruner.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from datetime import date


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python sweeps/calibrate.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--name", help="the track's name (default: the preset's)")
    p.add_argument("--steps", type=int, help="the step budget the track's runs use (default: the preset's own)")
    p.add_argument("--delta", type=int, default=0, help="extra steps for the exchange rate (0: not measured)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--target", type=float, help="the track's target loss (default: mean + 3 x noise, rounded up)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from speedrun.config import TrainConfig, parse_overrides
    from speedrun.train import train
    from sweeps.sweep_data import Fingerprints, measured, prepare_data

    if args.seeds < 2:
        print("error: --seeds must be >= 2 (a track needs its run-to-run spread)", file=sys.stderr)
        return 2
    sets = parse_overrides(args.sets)
    base = TrainConfig.resolve(args.preset, sets, args.steps)
    base = base.override(prepare_data(base, None))
    seen = measured(base, Fingerprints())
    budgets = [seen.steps] + ([seen.steps + args.delta] if args.delta else [])
    finals: dict[int, list[float]] = {b: [] for b in budgets}
    times: list[float] = []
    curves: list[list[tuple[float, float]]] = []
    for steps in budgets:
        for seed in range(args.seeds):
            cfg = base.override({"run.seed": seed}) if steps == seen.steps else TrainConfig.resolve(
                args.preset, {**sets, "run.seed": seed, "data.data_dir": base.data.data_dir}, steps)
            result = train(cfg)
            finals[steps].append(result.val_loss)
            if steps == seen.steps:
                times.append(result.train_time_s)
                curves.append([(h["step"] / steps, h["val_loss"]) for h in result.history])
            print(f"{steps} steps, seed {seed}: val_loss {result.val_loss:.4f} in {result.train_time_s:.2f}s "
                  f"({result.status})", file=sys.stderr)
    print(track_toml(args, seen, finals, times, curves))
    return 0


def track_toml(args, seen, finals: dict[int, list[float]], times: list[float], curves: list) -> str:
    """The measured track as a [name] table for tracks.toml."""
    from sweeps.tracking import hardware

    out = []
    losses = finals[seen.steps]
    mean, noise = statistics.fmean(losses), statistics.stdev(losses)
    target = args.target if args.target is not None else math.ceil((mean + 3 * noise) * 1000) / 1000
    out.append(f"[{args.name or args.preset}]")
    out.append(f'description = "preset {args.preset}{" with " + ", ".join(args.sets) if args.sets else ""}, '
          f'{seen.steps} steps"')
    out.append(f'data_source = "{seen.data_source}"')
    out.append(f'val_pattern = "{seen.val_pattern}"')
    out.append(f"val_tokens = {seen.val_tokens}")
    out.append(f"step_budget = {seen.steps}")
    out.append(f'val_sha256 = "{seen.val_sha256}"')
    out.append(f"target_loss = {target}")
    out.append(f"record_time_s = {statistics.fmean(times):.3f}")
    out.append(f"time_noise = {statistics.stdev(times):.3f}")
    out.append(f"record_runs = {len(times)}")
    out.append(f"record_steps = {seen.steps}")
    out.append(f'hardware = "{hardware()}"')
    out.append(f'source = "python sweeps/calibrate.py --preset {args.preset} --seeds {args.seeds}'
          f'{" --steps " + str(args.steps) if args.steps else ""}, {date.today()}: final val loss {mean:.4f} ± '
          f'{noise:.4f}, times {", ".join(f"{t:.2f}" for t in times)} s"')
    out.append(f"noise = {noise:.4f}")
    if args.delta:
        rate = 100.0 * (mean - statistics.fmean(finals[seen.steps + args.delta])) / args.delta
        out.append(f"exchange_rate = {rate:.4f}")
    curve = [(f, statistics.fmean(c[i][1] for c in curves)) for i, (f, _) in enumerate(curves[0])]
    out.append(f"curve_steps = {seen.steps}")
    out.append("curve = [" + ", ".join(f"[{f:.3f}, {v:.4f}]" for f, v in curve) + "]")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
