"""The record MLP's forward + backward on one GPU, relu^2 fused into its matmuls (speedrun.mlp_kernels) or not.

    python benchmarks/mlp_kernels.py                   # a record micro-batch (49,152 tokens), 768 -> 3072 -> 768
    python benchmarks/mlp_kernels.py --tokens 16384 --reps 50

Both variants run the delayed-FP8 MLP (speedrun.fp8_mlp) under torch.compile, as the trainer does, side by side
in one process on the same inputs; "per step" multiplies by 12 layers x 8 micro-batches (one GPU's share of a
record step at stage 3 on 8 GPUs, or one GPU doing the whole step by accumulation). A second table times the two
fused products alone against what they replace (the product, then the elementwise pass).
"""

from __future__ import annotations

import argparse
import sys

import torch

from speedrun.fp8_mlp import DelayedScales, fp8_delayed_mlp

LAYERS_X_MICRO_BATCHES = 12 * 8


def time_variant(fused: bool, tokens: int, reps: int) -> tuple[float, float]:
    """(ms of forward + backward per call, peak GiB) for one MLP at `tokens` rows."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    x = torch.randn(tokens, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_fc = (torch.randn(3072, 768, device="cuda") * 0.03).requires_grad_()
    w_proj = (torch.randn(768, 3072, device="cuda") * 0.01).requires_grad_()
    g = torch.randn(tokens, 768, device="cuda", dtype=torch.bfloat16)
    state = DelayedScales(1.8, 1.12).cuda()
    mlp = torch.compile(fp8_delayed_mlp, fullgraph=True)

    def step():
        y = mlp(x, w_fc, w_proj, state, fused=fused)
        torch.autograd.backward(y, g)

    for _ in range(3):  # compile, then the delayed scales' path
        step()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(step, warmup=5, rep=reps, return_mode="median")
    return ms, torch.cuda.max_memory_allocated() / 2**30


def time_parts(tokens: int, reps: int) -> dict[str, tuple[float, float]]:
    """{part: (torch ms, fused ms)} for the up-projection + relu^2 + amax and the down-projection's d_pre."""
    from triton.testing import do_bench

    from speedrun.fp8 import E4M3, E4M3_MAX, quantize
    from speedrun.mlp_kernels import down_relu_square_grad, up_relu_square

    torch.manual_seed(0)
    xq, sx = quantize(torch.randn(tokens, 768, device="cuda", dtype=torch.bfloat16), E4M3, E4M3_MAX)
    wq, sw = quantize(torch.randn(3072, 768, device="cuda") * 0.03, E4M3, E4M3_MAX)
    g = torch.randn(tokens, 768, device="cuda", dtype=torch.bfloat16)
    w_proj = torch.randn(768, 3072, device="cuda", dtype=torch.bfloat16) * 0.01
    post = up_relu_square(xq, sx, wq, sw, torch.bfloat16, fused=False)[0]
    up = torch.compile(up_relu_square)  # the torch path as Inductor fuses it
    down = torch.compile(down_relu_square_grad)
    bench = lambda fn: do_bench(fn, warmup=5, rep=reps, return_mode="median")  # noqa: E731
    return {"up: x @ w_fc^T, relu^2, amax": tuple(bench(lambda f=f: up(xq, sx, wq, sw, torch.bfloat16, f))
                                                   for f in (False, True)),
            "down: 2 (g @ w_proj) sqrt(post)": tuple(bench(lambda f=f: down(g, w_proj, post, f))
                                                      for f in (False, True))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=49152, help="rows of one micro-batch")
    ap.add_argument("--reps", type=int, default=200, help="milliseconds of timed repetitions (do_bench's rep)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device with FP8 (compute capability >= 8.9)")
        return 1
    rows = {name: time_variant(fused, args.tokens, args.reps) for name, fused in [("torch", False), ("fused", True)]}
    base = rows["torch"][0]
    print(f"\n{torch.cuda.get_device_name()}, {args.tokens} tokens, torch {torch.__version__}\n")
    print("| MLP | fwd+bwd ms | per step ms | vs torch | peak GiB |\n|---|---|---|---|---|")
    for name, (ms, peak) in rows.items():
        print(f"| {name} | {ms:.3f} | {ms * LAYERS_X_MICRO_BATCHES:.1f} | {base / ms:.2f}x | {peak:.2f} |")
    print("\n| part | torch ms | fused ms | vs torch |\n|---|---|---|---|")
    for part, (plain, fused) in time_parts(args.tokens, args.reps).items():
        print(f"| {part} | {plain:.3f} | {fused:.3f} | {plain / fused:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
