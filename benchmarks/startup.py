"""Trial start-up with cold and warm compile caches: what a sweep's trials pay before their first timed step.

    python benchmarks/startup.py                                  # record preset, 20 steps, cold / node / artifacts
    python benchmarks/startup.py --steps 40 --set run.warmup_steps=2
    python benchmarks/startup.py --runs node node --cache-dir SWEEP/inductor_cache --set ...  # the sweep's config
    python benchmarks/startup.py --tiny                           # the tiny preset (on a CPU: nothing compiles)
    python benchmarks/startup.py --runs cold --set run.warmup_workers=2   # later phases compiled by 2 helpers

Each row is a fresh Python process that builds the trainer and runs its warm-up (untimed steps at every stage's
shape, then validation: the compilations a trial does before it starts its clock), as a sweep's trial worker
does:
  cold       empty Inductor cache folder, no artifacts: everything compiles;
  node       the cold run's Inductor cache folder (a later trial on the same node: `TORCHINDUCTOR_CACHE_DIR`
             is one folder per sweep);
  artifacts  an empty Inductor cache folder, but the portable cache artifacts the cold run saved are loaded
             first (a later trial on another node of the cluster: sweeps.compile_cache.ArtifactStore).
Each warm-up phase (a stage shape's steps, a validation shape) prints its seconds to stderr as it ends (a run cut
short still says where its time went). "start-up s" is
from the parent's launch of the process to the end of warm-up (Python and torch import,
data, model, compile); "compile s" is the warm-up alone; "dynamo s" the part dynamo's own timers attribute to
tracing and the backend ("backend s", Inductor and AOTAutograd, cache loads included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(spec: dict) -> None:
    """One trial worker's start-up, measured from inside; prints one JSON line."""
    profiler = None
    if spec.get("profile"):
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    from sweeps.compile_cache import ArtifactStore, compile_counters
    from speedrun.config import TrainConfig
    from speedrun.train import _Trainer

    imported = time.time()
    cfg = TrainConfig.from_dict(spec["config"])
    store = ArtifactStore(spec["store"])
    loaded = store.load("bench") if spec["load"] else False
    trainer = _Trainer(cfg, report=None, log=lambda line: print(line, flush=True))  # the warm-up's phases
    compile_s = trainer.warmup()
    end = time.time()
    if profiler:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    saved = store.save("bench") if spec["save"] else 0
    from torch._dynamo.utils import compilation_time_metrics as timers

    def total(*names: str) -> float:
        return sum(sum(timers.get(n, [])) for n in names)

    print("RESULT " + json.dumps({"end": end, "imported": imported, "init_s": trainer.init_s, "compile_s": compile_s,
                                  "loaded": loaded, "saved": saved,
                                  "dynamo_s": total("_compile.compile_inner", "compile_inner"),
                                  "backend_s": total("compile_fx", "OutputGraph.call_user_compiler"),
                                  **compile_counters()}), flush=True)


def run_one(name: str, spec: dict, cache_dir: str) -> dict:
    from sweeps.compile_cache import cache_env

    env = dict(os.environ, **cache_env(cache_dir), PYTHONPATH=str(ROOT))  # as a sweep's trials have them
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, tail = [], []
    for line in proc.stdout:  # the warm-up's phases as they finish: a run cut short still says where it got
        if line.startswith("RESULT "):
            lines.append(line)
        elif line.startswith("warm-up: "):
            print(f"# {name} {line.rstrip()} (at {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        else:
            tail = (tail + [line])[-60:]
    if proc.wait() or not lines:
        sys.exit(f"startup: the {name} run failed (exit {proc.returncode}):\n{''.join(tail)[-3000:]}")
    row = json.loads(lines[-1][len("RESULT "):])
    row["startup_s"] = row.pop("end") - t0
    row["import_s"] = row.pop("imported") - t0
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="the tiny preset (CPU smoke run) instead of record")
    p.add_argument("--steps", type=int, default=20, help="schedule length (stages keep their fractions)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as sweeps/run.py")
    p.add_argument("--runs", nargs="+", default=["cold", "node", "artifacts"],
                   choices=["cold", "node", "artifacts"], help="rows to measure, in order (cold must come first)")
    p.add_argument("--profile", metavar="DIR", help="profile each warm run (cProfile, from process start to the end "
                   "of warm-up): DIR/<run>.prof, and the top functions printed after the table")
    p.add_argument("--cache-dir", help="an Inductor cache folder that is already warm (a sweep's inductor_cache): "
                                       "measure `--runs node` against it, no cold run")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from speedrun.config import parse_overrides
    from speedrun.prefix import vocab_for_speed
    from speedrun.config import TrainConfig

    cfg = TrainConfig.preset("tiny" if args.tiny else "record").with_total_steps(args.steps)
    # the generated sample holds ~228k validation tokens, not the record's 10.5M; two validation forwards compile
    # the same graph as all of them
    sample_val = {} if args.tiny else {"data.val_tokens": 2 * cfg.data.val_micro_batch_tokens}
    cfg = cfg.override({"data.source": "sample", "data.bos_id": 127, "run.val_every": 10 ** 6, **sample_val,
                        **parse_overrides(args.set)})
    vocab, note = vocab_for_speed(cfg.model.prefix_vocab, tempfile.mkdtemp(prefix="speedrun-startup-"))
    cfg = cfg.override({"model.prefix_vocab": vocab})
    if note:
        print(f"# {note}", flush=True)
    if args.cache_dir and set(args.runs) != {"node"}:
        sys.exit("startup: --cache-dir measures warm runs against an existing cache: pass --runs node with it")
    if not args.cache_dir and args.runs[0] != "cold":
        sys.exit("startup: the first run must be cold (it fills the caches the others read): put cold first")
    import torch
    from speedrun import schedule as S
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {device} | torch {torch.__version__} | {'tiny' if args.tiny else 'record'} preset, "
          f"{args.steps} steps, {len(S.all_stages(cfg.schedule))} stage(s)", flush=True)
    print("| run | start-up s | imports s | trainer init s | compile s | dynamo s | backend s | graphs "
          "| FX hits/misses | AOT hits/misses/bypasses | artifacts MB |\n|---|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    profiles = []
    with tempfile.TemporaryDirectory() as work:
        node_cache, store = args.cache_dir or f"{work}/node", f"{work}/artifacts"
        for i, name in enumerate(args.runs):
            cold = name == "cold"
            spec = {"config": cfg.to_dict(), "store": store, "load": name == "artifacts", "save": cold}
            if args.profile and not cold:  # a cold run's profile is all compilation, and slowed down a lot
                os.makedirs(args.profile, exist_ok=True)
                spec["profile"] = os.path.join(args.profile, f"{i}_{name}.prof")
                profiles.append(spec["profile"])
            r = run_one(name, spec, node_cache if name in ("cold", "node") else f"{work}/empty{i}")
            mb = 0.0
            if cold:
                mb = r["saved"] / 2 ** 20
            elif name == "artifacts" and not r["loaded"] and r["graphs"]:
                sys.exit("startup: the cold run compiled but saved no artifacts to load")
            print(f"| {name} | {r['startup_s']:.1f} | {r['import_s']:.1f} | {r['init_s']:.1f} | "
                  f"{r['compile_s']:.1f} | {r['dynamo_s']:.1f} | "
                  f"{r['backend_s']:.1f} | {r['graphs']} | {r['fx_cache_hits']}/{r['fx_cache_misses']} | "
                  f"{r['aot_cache_hits']}/{r['aot_cache_misses']}/{r['aot_cache_bypasses']} | {mb:.1f} |", flush=True)

    for path in profiles:
        import pstats
        print(f"\n## {os.path.basename(path)}: top functions by cumulative, then by own time")
        stats = pstats.Stats(path, stream=sys.stdout).strip_dirs()
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
