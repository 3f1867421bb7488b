"""`speedrun-report --space muon_lr`: the leaderboard of a space's trials, read back from MLflow.

Ranked within each step budget (trials of different budgets are different jobs), best first (by final val loss of finished trials, or `--by time`: time to target, projected for misses),
each trial's verdict (candidate, reached, missed, not comparable, pruned, ...; sweeps/records.py), trials on a multi-objective sweep's Pareto front marked *. `--sweep NAME` limits it
to one sweep; `--tracking-uri` / MLFLOW_TRACKING_URI pick the store (default sqlite:///mlflow.db here).
"""

from __future__ import annotations

import argparse
import math
import sys

from sweeps.protocol import TrialStatus


def leaderboard(uri: str, space: str, sweep: str | None = None) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(space)
    if exp is None:
        raise LookupError(f"no MLflow experiment {space!r} in {uri}: run a sweep of that space first")
    query = "tags.kind = 'trial'" + (f" and tags.sweep_name = '{sweep}'" if sweep else "")
    rows = []
    for run in client.search_runs([exp.experiment_id], query, max_results=5000):
        t, m = run.data.tags, run.data.metrics
        rows.append({
            "sweep": t.get("sweep_name"), "trial": int(t.get("trial_index", -1)), "status": t.get("status"),
            "verdict": t.get("verdict") or t.get("status") or "-",
            "steps": _int(run.data.params.get("schedule.num_scheduled_steps"),
                          run.data.params.get("schedule.extension_steps")),
            "started": run.info.start_time, "val_loss": m.get("val_loss"),
            "train_time_s": m.get("train_time_s"), "time_to_target_s": m.get("time_to_target_s"),
            "objective_time_s": m.get("objective_time_s"), "pareto": t.get("pareto") == "true",
            "run_id": run.info.run_id,
            "params": {k: v for k, v in run.data.params.items()},
        })
    finished = lambda r: r["status"] == TrialStatus.FINISHED and r["val_loss"] is not None  # noqa: E731
    return sorted(rows, key=lambda r: (not finished(r), r["val_loss"] if r["val_loss"] is not None else math.inf))


def latest_sweep(rows: list[dict]) -> str | None:
    """The sweep whose trials started last: the one `record.py --space S --rank K` re-runs by default."""
    return max(rows, key=lambda r: r["started"] or 0)["sweep"] if rows else None


def _int(*values) -> int | None:
    """Sum of integer params (a trial's step budget: scheduled + extension steps); None if any is missing."""
    try:
        return sum(int(v) for v in values)
    except (TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    from sweeps.spaces import SpaceError, load_space
    from sweeps.tracking import resolve_uri

    p = argparse.ArgumentParser(prog="python sweeps/report.py", description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True)
    p.add_argument("--sweep", help="only this sweep (its --name)")
    p.add_argument("--tracking-uri")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--by", choices=["loss", "time"], default="loss",
                   help="rank by final val loss (default) or by time to target (projected for misses)")
    args = p.parse_args(argv)
    uri = resolve_uri(args.tracking_uri)
    try:
        keys = [q.key for q in load_space(args.space, "record").params]
        rows = leaderboard(uri, args.space, args.sweep)
        if args.by == "time":
            rows.sort(key=lambda r: (r["status"] != TrialStatus.FINISHED, r["objective_time_s"] or math.inf))
    except (SpaceError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = ["rank", "sweep", "trial", "steps", "status", *[k.split(".", 1)[1] for k in keys], "val_loss",
              "train_s", "objective_s", "verdict", "pareto"]
    rows.sort(key=lambda r: -(r["steps"] or 0))  # stable: the ranking holds within one step budget
    body, rank, budget = [], 0, object()
    for r in rows:
        rank = 1 if r["steps"] != budget else rank + 1
        budget = r["steps"]
        if rank > args.top:
            continue
        fmt = lambda v: "-" if v is None else f"{float(v):.4g}"  # noqa: E731
        body.append([str(rank), r["sweep"] or "", str(r["trial"]), str(r["steps"] or "-"), r["status"] or "",
                     *[fmt(r["params"].get(k)) if r["params"].get(k) is not None else "-" for k in keys],
                     fmt(r["val_loss"]), fmt(r["train_time_s"]), fmt(r["objective_time_s"]), r["verdict"],
                     "*" if r["pareto"] else ""])
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    for cells in [header, ["-" * w for w in widths], *body]:
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    n_cand = sum(r["verdict"] == "candidate" for r in rows)
    print(f"\n{len(rows)} trial runs of space {args.space} in {uri}; {n_cand} candidate(s): single runs faster than "
          "the record by more than its time noise; confirm with sweeps/record.py --run-id RUN")
    return 0


if __name__ == "__main__":
    sys.exit(main())
