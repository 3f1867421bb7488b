"""What each Triton build candidate of `speedrun.kernel_tuning` costs: seconds to compile (empty Triton cache) and
milliseconds to run, at the record's shapes on one GPU. Every candidate a cold trainer times is also compiled, in
its warm-up, so a candidate that never wins costs start-up and nothing else.

    python benchmarks/kernel_builds.py                  # one record micro-batch: 49,152 rows, vocabulary 50,304
    python benchmarks/kernel_builds.py --rows 65536

Families: the fused MLP's up and down products (speedrun.mlp_kernels) and the head's gradient pass for one and
two prediction targets (speedrun.head_kernels). Prints one table, fastest first within a family.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial


def timed(run) -> tuple[float, float]:
    """(seconds of the first call, compile included; median ms of the calls after it)."""
    import torch

    from speedrun.kernel_tuning import _do_bench  # the tuner's own timing

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    return first, _do_bench(run)


def mlp_candidates(rows: int) -> dict[tuple, callable]:
    import torch

    from speedrun import mlp_kernels as mk
    from speedrun.fp8 import E4M3, E4M3_MAX, quantize

    a, sa = quantize(torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16), E4M3, E4M3_MAX)
    b, sb = quantize(torch.randn(3072, 768, device="cuda") * 0.03, E4M3, E4M3_MAX)
    post = torch.empty(rows, 3072, device="cuda", dtype=torch.bfloat16)
    scale = (sa * sb).reshape(1).float()
    partial_max = torch.empty(max((rows // 128) * 24, 1024), device="cuda", dtype=torch.float32)
    g = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, 3072, device="cuda", dtype=torch.bfloat16) * 0.01
    out = torch.empty(rows, 3072, device="cuda", dtype=torch.bfloat16)
    runs = {("up",) + v: partial(mk._run_up, v, a, b, post, scale, partial_max)
            for v in mk._divides(mk._UP_VARIANTS, rows, 3072, 768)}
    runs.update({("down",) + v: partial(mk._run_down, v, g, w, post, out)
                 for v in mk._divides(mk._DOWN_VARIANTS, rows, 3072, 768)})
    return runs


def head_candidates(rows: int, vocab: int, targets: int) -> dict[tuple, callable]:
    import torch

    from speedrun import head_kernels as hk

    z = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16) * 3
    tgt = torch.randint(0, vocab, (rows, targets), device="cuda", dtype=torch.int32)
    coef = torch.full((rows, targets), 1.0 / rows, device="cuda")
    softcap = torch.tensor([23.0, 5.0, 7.5], device="cuda")
    lse = torch.logsumexp(z.float(), dim=-1)
    inv_sg = torch.ones(1, device="cuda")
    gq = torch.empty(rows, vocab, device="cuda", dtype=hk.E5M2)
    gqt = torch.empty(vocab, rows, device="cuda", dtype=hk.E5M2)
    args = (z, lse, tgt, coef, softcap, inv_sg, gq, gqt, rows, vocab, targets)
    return {(f"head K={targets}", name): partial(run, *args) for name, run in hk._GRAD_VARIANTS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=49152, help="tokens in one micro-batch")
    p.add_argument("--vocab", type=int, default=50304)
    args = p.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel-builds-")  # every build compiles here
    import torch

    if not torch.cuda.is_available():
        print("kernel_builds: needs a CUDA GPU (the candidates are Triton kernels)", file=sys.stderr)
        return 2
    families = [mlp_candidates(args.rows), head_candidates(args.rows, args.vocab, 1),
                head_candidates(args.rows, args.vocab, 2)]
    print("| family | build | first call s (compile) | ms | vs fastest |\n|---|---|---|---|---|")
    total = 0.0
    for runs in families:
        rows = []
        for key, run in runs.items():
            try:
                first, ms = timed(run)
            except Exception as e:  # noqa: BLE001 (a build the GPU cannot hold drops out, as in kernel_tuning)
                print(f"| {key[0]} | {key[1:]} | failed: {type(e).__name__} | - | - |")
                continue
            total += first
            rows.append((key, first, ms))
        for fam in sorted({k[0] for k, _, _ in rows}):
            mine = sorted((r for r in rows if r[0][0] == fam), key=lambda r: r[2])
            for key, first, ms in mine:
                print(f"| {fam} | {' '.join(map(str, key[1:]))} | {first:.2f} | {ms:.3f} | {ms / mine[0][2]:.2f}x |")
    print(f"\nfirst calls in all: {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
