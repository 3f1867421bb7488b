"""Training throughput of the `record` preset on one GPU: ms/step, tokens/s, MFU, peak memory, compile time.

    python benchmarks/throughput.py                 # every stage, 10 timed steps each, the fast path
    python benchmarks/throughput.py --stage 3 --steps 20
    python benchmarks/throughput.py --plain         # eager, SDPA attention, no FP8: the portable path
    python benchmarks/throughput.py --stage 3 --blocks off   # record #89's blocks off (MUDD, XSA, DC-MHA, ...)

Steps are real trainer steps (`_Trainer.train_step`: forward, backward, NorMuon and Adam) at each stage's
shape: batch, sequence length, windows and MTP weights, from the stage's first scheduled step on. Tokens are
random GPT-2 ids in documents of random length (mean 700 tokens, BOS-separated), written as FineWeb-format
shards to a temporary folder; speed does not depend on the values. Each stage first runs --warmup untimed
steps (the first of them compiles); "compile s" is that warm-up's time minus the same number of timed steps.

MFU counts model FLOPs analytically per optimiser step over tokens T:
    6 * N * T                       N = weights of the matrix products (attention qkv/out, MLP, lm_head)
  + 12 * T * H * D * w  per layer   attention QK^T and PV, forward + backward, w = keys per query: the window
                                    (twice the window on paired-head layers, whose sequence is doubled)
divided by the step time and by the H100 SXM's dense bf16 peak, 989 TFLOP/s (the GPU machine's H100 reaches
about 800 TFLOP/s on a large bf16 matmul). Windows count in full, so documents shorter than the window make
the attention term an upper bound; MTP heads share the logits and add no matrix products; FP8 matmuls are
counted like bf16 ones.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from speedrun import schedule as S  # noqa: E402
from speedrun.config import ModelConfig, TrainConfig  # noqa: E402
from speedrun.data import write_shard  # noqa: E402
from speedrun.prefix import vocab_for_speed  # noqa: E402
from speedrun.train import _Trainer  # noqa: E402

PEAK_BF16 = 989e12
# record #89's blocks (README's technique table); --blocks off sets each back to the pre-#89 default
RECORD89_BLOCKS = ("bigram_hash", "bigram_sign_rows", "use_skip_connections", "xsa_layers", "qk_head_pairs",
                   "use_sa_lambdas", "mudd", "dc_layers", "prefix_vocab", "ve_gate_input", "fp8_mlp_scaling")


def blocks_off() -> dict:
    base = ModelConfig()
    return {f"model.{k}": list(v) if isinstance(v := getattr(base, k), tuple) else v for k in RECORD89_BLOCKS}


def random_shards(folder: Path, tokens: int, vocab: int, bos: int, mean_doc: int = 700, seed: int = 0) -> None:
    """A training shard of `tokens` random ids and a 1M-token validation shard drawn apart from it (the validation
    tokens were once the training shard's first ones, which the first steps train on)."""
    rng = np.random.default_rng(seed)
    val_tokens = 1 << 20
    ids = rng.integers(0, bos, size=tokens + val_tokens, dtype=np.int64)
    ids[rng.random(tokens + val_tokens) < 1 / mean_doc] = bos
    ids[0] = ids[tokens] = bos
    write_shard(folder / "fineweb_train_000001.bin", ids[:tokens])
    write_shard(folder / "fineweb_val_000000.bin", ids[tokens:])


def model_flops(cfg: TrainConfig, stage: S.Stage) -> float:
    m = cfg.model
    T = stage.tokens_per_step
    n = m.padded_vocab_size * m.dim  # lm_head
    attn_flops = 0.0
    for layer in range(m.n_layer):
        n += 2 * m.dim * m.mlp_dim
        if layer in m.no_attn_layers:
            continue
        n += 4 * m.dim * m.dim
        window = (stage.long_window if layer in m.long_window_layers else stage.short_window) * m.block_size
        if m.use_paired_heads and layer in m.paired_head_layers:
            window *= 2
        attn_flops += 12 * T * m.n_head * m.head_dim * window
    return 6 * n * T + attn_flops


def print_compile_metrics(stage: int, seen: int = 0) -> int:
    """Each compilation after the first `seen` (dynamo frame or backward graph): its phases and its slowest Triton
    kernels to build. Returns how many compilations there are now."""
    import json
    from torch._dynamo.utils import get_compilation_metrics
    metrics = get_compilation_metrics()
    print(f"# compilations up to stage {stage} (seconds; kernels: Triton build seconds, slowest first)", flush=True)
    for m in metrics[seen:]:
        us = lambda name: (getattr(m, name, None) or 0) / 1e6  # noqa: E731
        try:  # a JSON list of [kernel, microseconds], slowest first
            kernels = json.loads(getattr(m, "triton_kernel_compile_times_us", None) or "[]")
        except ValueError:
            kernels = []
        print(f"#  {m.co_name} frame {m.entire_frame_compile_time_s or 0:.1f} backend {m.backend_compile_time_s or 0:.1f}"
              f" inductor {m.inductor_compile_time_s or 0:.1f} codegen {m.code_gen_time_s or 0:.1f}"
              f" triton {us('triton_compile_time_us'):.1f} backward {us('backward_cumulative_compile_time_us'):.1f}"
              f" runtime={m.is_runtime}", flush=True)
        for name, t in kernels[:6]:
            print(f"#      {t / 1e6:6.1f}  {name}", flush=True)
    return len(metrics)


def profile_steps(trainer, st: S.Stage, args, sync) -> None:
    """Profile two steps of `st`: kernels by device time, then the same ops split by input shape."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for i in range(2):
            trainer.train_step(min(st.start + args.warmup + args.steps + i, st.end - 1))
        sync()
    tables = []
    for by_shape in (False, True):
        averages = prof.key_averages(group_by_input_shape=by_shape)
        try:
            tables.append(averages.table(sort_by="self_device_time_total", row_limit=120, max_name_column_width=110,
                                         max_shapes_column_width=110))
        except Exception:  # older torch names it after CUDA
            tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=120, max_name_column_width=110))
    trace = args.trace or str(Path(tempfile.mkdtemp(prefix="speedrun-trace-")) / "trace.json")
    prof.export_chrome_trace(trace)
    summary = kernel_summary(trace, steps=2)
    Path(args.profile).write_text("\n\n".join([summary, *tables]))
    print(summary + "\n" + tables[0][:6000])


# kernel families by name, first match wins (FP8 before other matmuls: cuBLAS names both nvjet/sm90_xmma)
KERNEL_FAMILIES = (("fp8 matmul", r"e4m3|e5m2|f8f8|_fp8|fp8_|nvjet_sm\d+_[qr]"),
                   ("mlp (fused fp8)", r"up_(ptr|tma)_kernel|down_(ptr|tma)_kernel"),
                   ("bf16 matmul", r"nvjet|gemm|xmma|cutlass|sm90_"),
                   ("flex attention", r"flex_attention"),
                   ("head loss", r"lse_loss_kernel|grad_kernel|transpose_kernel"),
                   ("qk norm+rope", r"qk_norm_rope"),
                   ("nccl", r"nccl"),
                   ("inductor", r"^triton_"),
                   ("copies", r"[Mm]emcpy|[Mm]emset"))


def kernel_summary(trace_path: str, steps: int) -> str:
    """GPU time per step by kernel family, and how much of the profiled span the GPU was busy (the rest is the
    GPU waiting for the host: launch overhead, synchronisation, Python)."""
    import json
    import gzip
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return "# no GPU kernels in the profile"
    kernels = sorted(kernels, key=lambda e: e["ts"])
    gaps = idle_stretches(kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - kernels[0]["ts"]
    busy = span - sum(g[0] for g in gaps)
    families: dict[str, float] = {}
    for e in kernels:
        name = e.get("name", "")
        fam = next((f for f, pat in KERNEL_FAMILIES if re.search(pat, name)), "other")
        families[fam] = families.get(fam, 0.0) + e["dur"]
    lines = [f"# GPU busy {busy / steps / 1e3:.1f} ms of {span / steps / 1e3:.1f} ms per step "
             f"({100 * busy / span:.1f}%); kernel time per step by family:",
             "| family | ms/step | share of kernel time |", "|---|---|---|"]
    total = sum(families.values())
    for fam, us in sorted(families.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {fam} | {us / steps / 1e3:.1f} | {100 * us / total:.1f}% |")
    return "\n".join(lines + idle_gaps(events, gaps))


def idle_stretches(kernels: list[dict]) -> list[tuple[float, float, dict, dict]]:
    """(length, start, kernel before, kernel after) of each stretch with no kernel running; kernels by start."""
    gaps, end, before = [], kernels[0]["ts"] + kernels[0]["dur"], kernels[0]
    for k in kernels[1:]:
        if k["ts"] > end:
            gaps.append((k["ts"] - end, end, before, k))
        if k["ts"] + k["dur"] >= end:
            end, before = k["ts"] + k["dur"], k
    return gaps


def idle_gaps(events: list[dict], gaps: list[tuple[float, float, dict, dict]], top: int = 12) -> list[str]:
    """The longest stretches with no kernel on the GPU: the kernels either side, when the host launched the
    next one (late: the host was busy), and the host ops that enclose that launch, outermost first."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    lines = [f"# idle gaps: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.1f} ms in all; the longest:",
             "| gap us | after kernel | next kernel | launched us into gap | host ops around the launch |",
             "|---|---|---|---|---|"]
    for gap, start, prev, nxt in sorted(gaps, key=lambda g: -g[0])[:top]:
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        late, around = "?", ""
        if launch:
            late = f"{launch['ts'] - start:.0f}"
            enclosing = sorted((e for e in host_ops if e.get("tid") == launch.get("tid")
                                and e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]), key=lambda e: e["ts"])
            names = [e["name"][:40] for e in enclosing]
            around = " > ".join(names if len(names) <= 3 else names[:1] + ["..."] + names[-2:])
        lines.append(f"| {gap:.0f} | {prev.get('name', '')[:50]} | {nxt.get('name', '')[:50]} | {late} | {around} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per stage (the first compiles)")
    ap.add_argument("--stage", type=int, nargs="*", help="stage numbers, 1-based (default: all)")
    ap.add_argument("--plain", action="store_true", help="the portable path: eager, SDPA, no FP8")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--profile", type=str, default="", help="after timing, profile 2 steps; write a table here")
    ap.add_argument("--trace", type=str, default="", help="with --profile: also a Chrome trace (.json.gz) here")
    ap.add_argument("--compile-times", action="store_true",
                    help="after each stage's warm-up, print where dynamo/Inductor spent their compile seconds")
    ap.add_argument("--preset", default="record", help="(tiny: a CPU smoke test of this script)")
    ap.add_argument("--blocks", choices=["on", "off"], default="on",
                    help="off: record #89's blocks (MUDD, XSA, DC-MHA, prefix loss, ...) switched off")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and args.preset == "record":
        sys.exit("throughput.py needs a CUDA device for the record preset")

    work = Path(tempfile.mkdtemp(prefix="speedrun-bench-"))
    over = {"data.data_dir": str(work), "data.val_tokens": 65536, "run.warmup_steps": 0}
    if args.plain:
        over.update({"run.compile": False, "model.use_fp8": False, "model.attn_kernel": "sdpa"})
    if args.blocks == "off":
        over.update(blocks_off())
    over.update(dict(kv.split("=", 1) for kv in args.set))
    if args.preset != "record":
        over.update({"data.source": "fineweb", "data.bos_id": 127, "data.val_tokens": 4096})
    cfg = TrainConfig.preset(args.preset).override(over)
    vocab, note = vocab_for_speed(cfg.model.prefix_vocab, work)
    cfg = cfg.override({"model.prefix_vocab": vocab})
    if note:
        print(f"# {note}", flush=True)
    stages = S.all_stages(cfg.schedule)
    chosen = [stages[i - 1] for i in (args.stage or range(1, len(stages) + 1))]
    need = sum(st.tokens_per_step for st in chosen) * (args.steps + args.warmup) + (1 << 22)
    random_shards(work, need, cfg.model.vocab_size, cfg.data.bos_id)

    t0 = time.perf_counter()
    trainer = _Trainer(cfg, report=None, log=None)
    setup_s = time.perf_counter() - t0
    path = "plain (eager, SDPA, bf16)" if args.plain else (
        f"fast (compile={cfg.run.compile}, flex={trainer.flex}, fp8={cfg.model.use_fp8})") + f" | #89 blocks {args.blocks}"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'} | torch {torch.__version__} | {path} | set-up {setup_s:.1f}s", flush=True)

    rows, compilations = [], 0
    for st in chosen:
        if st.start > cfg.model.untie_step >= 0 and trainer.model.tied:  # as the real run would be by now
            trainer.model.untie()
        sync()
        t_w = time.perf_counter()
        for i in range(args.warmup):
            trainer.train_step(st.start + i)
        sync()
        warm_s = time.perf_counter() - t_w
        if args.compile_times:
            compilations = print_compile_metrics(st.index + 1, compilations)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t_s = time.perf_counter()
        losses = [trainer.train_step(min(st.start + args.warmup + i, st.end - 1)) for i in range(args.steps)]
        sync()
        ms = (time.perf_counter() - t_s) * 1e3 / args.steps
        loss = losses[-1].item()  # read after the clock stops: a speed of a diverged run means nothing
        tps = st.tokens_per_step / (ms / 1e3)
        mfu = model_flops(cfg, st) / (ms / 1e3) / PEAK_BF16
        compile_s = max(0.0, warm_s - args.warmup * ms / 1e3)
        rows.append((st.index + 1, st.tokens_per_step, st.max_seq_len, f"{st.short_window}/{st.long_window}",
                     ms, tps, mfu, (torch.cuda.max_memory_allocated() if cuda else 0) / 2**30, compile_s, loss))
        r = rows[-1]  # each row as soon as it is measured: a run cut short still leaves its finished stages
        print(f"stage {r[0]}: {ms:.1f} ms/step, {tps / 1e3:.0f}k tokens/s, MFU {100 * mfu:.1f}%, "
              f"peak {r[7]:.1f} GiB, compile {compile_s:.0f} s, last loss {loss:.4f}", flush=True)
        if not math.isfinite(loss):
            print(f"# stage {r[0]}: the training loss is not finite: this speed is of a diverged run", flush=True)
        if args.profile:
            profile_steps(trainer, st, args, sync)

    print("\n| stage | tokens/step | seq len | windows | ms/step | tokens/s | MFU | peak mem GiB | compile s "
          "| last loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5] / 1e3:,.0f}k | {100 * r[6]:.1f}% "
              f"| {r[7]:.1f} | {r[8]:.0f} | {r[9]:.4f} |")
    print(f"\n{args.steps} timed steps after {args.warmup} warm-up steps per stage; MFU against 989 TFLOP/s bf16.")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
