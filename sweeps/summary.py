"""What a sweep prints: its header, the verdict line (the sweep's headline about the record) and the end-of-sweep
summary (ranked table, Pareto front, counts, where the device time went)."""

from __future__ import annotations

import sys
from collections import Counter

from sweeps.protocol import RANKING, TrialStatus
from sweeps.records import CANDIDATE, NOISE_SIGMAS, within_noise
from sweeps.results import format_table, ranked


def resume_command(name: str, storage) -> str:
    """The command that continues an interrupted sweep, as this one was started: the `speedrun-sweep` entry
    point, or this interpreter with sweeps/run.py (a bare `python` may not be the one with the packages)."""
    import os

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "speedrun-sweep":
        cmd = argv0
    else:
        cmd = f"{sys.executable} {os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run.py')}"
    return f"{cmd} --resume --name {name} --storage {storage}"


def header(sweep) -> str:
    from speedrun.config import recompiles
    from sweeps.search import STUDY_FILE, sampler_choice

    w, space, plan = sweep, sweep.space, sweep.plan
    lines = [f"{'resuming' if w.restore else 'sweep'} {plan.name}: space {space.name} "
             f"({', '.join(p.key for p in space.params)}), preset {w.preset}, {plan.trials} trials of "
             f"{plan.total_steps} steps, {plan.concurrency} at a time, {w.workers} {'GPU' if w.use_gpu else 'CPU'} "
             f"worker(s) each, scheduler {plan.scheduler}; folder {plan.storage.uri(plan.name)}",
             f"{sampler_choice(plan).describe()}, seed {plan.seed}; Optuna study {plan.name!r} in "
             f"{plan.folder / STUDY_FILE}",
             f"verdicts: {w.judge.describe()}"]
    if getattr(w.spec, "source_path", None):
        lines.append(f"trainer: {w.spec.source_path} (each trial runs a patched copy in {w.spec.code_dir}/<trial id>/, "
                     f"its diff in diff.patch)")
    elif w.use_gpu and w.spec.config_for(space.control_point()).run.compile:
        shaping = [p.key for p in space.params if recompiles(p.key)]
        lines.append(f"compile caches: {plan.folder / 'inductor_cache'} and {w.spec.compile_cache}; "
                     + (f"{', '.join(shaping)} change compiled graphs: each new value compiles" if shaping
                        else "every searched knob is a tensor in the compiled graphs: trials after the first start "
                             "warm"))
    return "\n".join(lines)


def verdict_line(rows: list[dict], judge) -> str:
    """Counts of each verdict word, and what a candidate is worth."""
    if not judge.comparable:
        return f"verdicts: {judge.describe()}"
    counts = Counter(r.get("verdict") or "-" for r in rows)
    line = (f"verdicts against track {judge.track.summary()}: "
            + ", ".join(f"{n} {word}" for word, n in counts.most_common()))
    if counts.get(CANDIDATE):
        line += ("\n  a candidate is one run: confirm it with several seeds "
                 "(--confirm-top, or sweeps/record.py --run-id RUN --runs 10)")
    return line


def mark_noise(rows: list[dict], noise: float | None) -> str | None:
    """Give each finished row its loss gap to the best (`vs_best`, "~" when seeds alone make such a gap);
    return a line when no trial is better than the others beyond that noise."""
    done = [r for r in rows if r["status"] == TrialStatus.FINISHED and r.get("val_loss") is not None]
    if not done:
        return None
    best = min(done, key=lambda r: r["val_loss"])
    for r in done:
        gap = r["val_loss"] - best["val_loss"]
        r["vs_best"] = ("best" if r is best else f"+{gap:.4f}") + ("~" if r is not best and within_noise(gap, noise)
                                                                  else "")
    tied = [r["trial_index"] for r in done if r is not best and within_noise(r["val_loss"] - best["val_loss"], noise)]
    if not noise:
        return "no seed noise known for this track: gaps between trials cannot be told from seed noise"
    if tied:
        return (f"no winner beyond noise: trial(s) {', '.join(map(str, sorted(tied)))} within "
                f"{NOISE_SIGMAS:.2f} x {noise:g} (the track's seed-to-seed spread) of the best, trial "
                f"{best['trial_index']} (~ in vs_best); re-run them with --confirm-top before believing an order")
    return None


def summary(sweep, rows: list[dict], front: list[dict], split, seconds: float) -> str:
    keys = [p.key for p in sweep.space.params]
    noise_line = mark_noise(rows, sweep.judge.track.noise if sweep.judge.comparable else None)
    out = ["", format_table(ranked(rows, *RANKING[sweep.plan.objective]), keys)]
    if noise_line:
        out.append(noise_line)
    if sweep.plan.objective == "pareto":
        out += [f"\nPareto front (val_loss vs training time; {len(front)} of {len(rows)} trials):",
                format_table(front, keys, top=len(front))]
    counts = Counter(str(r["status"]) for r in rows)
    out += [f"\n{len(rows)} trials in {seconds:.0f}s ("
            + ", ".join(f"{counts.get(s.value, 0)} {s.value}" for s in (TrialStatus.FINISHED, TrialStatus.PRUNED,
                                                                         TrialStatus.DIVERGED, TrialStatus.FAILED))
            + ("); * = trial 0, the file as it is (control)" if sweep.preset == "script"
               else f"); * = trial 0, the {sweep.preset} preset's values (control)"),
            verdict_line(rows, sweep.judge), split.format("GPU" if sweep.use_gpu else "worker")]
    return "\n".join(out)
