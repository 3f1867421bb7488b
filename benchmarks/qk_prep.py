"""Attention's query/key preparation on one GPU: sa_lambda scale, QK RMS norm, half-RoPE and the attention scale.

    python benchmarks/qk_prep.py                  # a record micro-batch: 49,152 tokens, 6 heads of 128
    python benchmarks/qk_prep.py --tokens 16384 --reps 50

Forward + backward of the same maths written several ways, each under torch.compile as the trainer compiles it,
side by side in one process on the same inputs. The profile of a stage-3 step showed Inductor's fused backward
kernels for this part running ~3.5x over the bytes they move; the variants say which part costs it:

    in-graph    lambda * q, F.rms_norm, cos/sin computed from positions inside the compiled graph
    table       cos/sin read from a precomputed (T, D/2) table instead
    weight      lambda not applied here (record #89 multiplies it into the qkv weight, where its gradient is a
                reduction over the 3 x 768 x 768 weight instead of over every q and k element)
    both        table + weight
    fused       weight, with norm + RoPE in speedrun.qk_kernels' Triton kernels (what the trainer runs)

"bytes" is the time the reads and writes alone need at the given bandwidth. The agreement columns compare each
variant with the first (in-graph); the "weight" variants differ by lambda = 0.5 (not applied) and carry no lambda
gradient. "per step" multiplies by 10 attention layers x 8 micro-batches (one GPU doing a stage-3 step by
accumulation).
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from speedrun.model import Rotary
from speedrun.qk_kernels import qk_norm_rope, rope, rotate_pairs

PER_STEP = 10 * 8


def cos_sin_table(T: int, freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.outer(torch.arange(T, device=freq.device, dtype=torch.float32), freq)
    return theta.cos()[None, :, None, :].to(dtype), theta.sin()[None, :, None, :].to(dtype)


def prepare(variant: str, qk: torch.Tensor, lam: torch.Tensor, freq: torch.Tensor, table, scale: torch.Tensor):
    q, k = qk.unbind(dim=2)
    if variant == "fused":
        return qk_norm_rope(q, freq, fused=True) * scale.to(q.dtype), qk_norm_rope(k, freq, fused=True)
    if variant not in ("weight", "both"):
        q, k = lam[0].type_as(q) * q, lam[0].type_as(k) * k
    q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    if variant in ("table", "both"):
        q, k = rotate_pairs(q, *table), rotate_pairs(k, *table)
    else:  # as the model writes it: cos/sin from positions, inside the graph
        q, k = rope(q, freq), rope(k, freq)
    return q * scale.to(q.dtype), k


def time_variant(variant: str, tokens: int, heads: int, head_dim: int, reps: int):
    """(forward + backward ms, forward ms, outputs and grads for the agreement check)."""
    torch.manual_seed(0)
    qk = (torch.randn(1, tokens, 2, heads, head_dim, device="cuda") * 0.5).bfloat16().requires_grad_()
    lam = torch.tensor([0.5, 1.0], device="cuda", requires_grad=True)
    freq = Rotary(head_dim, 1 / 1024, 0.12).freq.cuda()  # the record's half-truncated frequencies
    cos, sin = cos_sin_table(tokens, freq, torch.bfloat16)
    scale = torch.tensor(0.12, device="cuda")
    grads = [torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    torch._dynamo.reset()  # each variant (and grad mode) is a recompile of `prepare`: start from none
    fn = torch.compile(prepare, fullgraph=True, dynamic=False)

    def fwd_bwd():
        qk.grad = lam.grad = None  # (accumulating into them would add a kernel)
        q, k = fn(variant, qk, lam, freq, (cos, sin), scale)
        torch.autograd.backward((q, k), grads)

    def fwd():
        with torch.no_grad():
            fn(variant, qk, lam, freq, (cos, sin), scale)

    qk.grad = lam.grad = None
    q, k = fn(variant, qk, lam, freq, (cos, sin), scale)
    torch.autograd.backward((q, k), grads)
    result = (q.detach(), k.detach(), qk.grad.clone(), torch.zeros(2) if lam.grad is None else lam.grad.clone())
    return kernel_ms(fwd_bwd, reps), kernel_ms(fwd, reps), result


def kernel_ms(fn, reps: int) -> float:
    """Mean GPU kernel time per call, from the profiler: a few hundred us of GPU work per call hides behind the
    compiled function's own CPU overhead, so wall-clock timers measure that instead (and CUDA-graph capture
    fails on the custom ops' backward)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / reps / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=49152)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20, help="profiled calls per variant")
    ap.add_argument("--bandwidth", type=float, default=4.8, help="TB/s for the bytes column (H200: 4.8)")
    ap.add_argument("--variants", nargs="*", default=["in-graph", "table", "weight", "both", "fused"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("qk_prep.py times GPU kernels: run it on a machine with CUDA")
    elems = args.tokens * args.heads * args.head_dim
    # forward: read q,k, write q,k; backward: read dq,dk and q,k, write their grads (bf16, 2 bytes each)
    fwd_bytes, bwd_bytes = 4 * elems * 2, 6 * elems * 2
    bytes_ms = (fwd_bytes + bwd_bytes) / (args.bandwidth * 1e12) * 1e3
    print(f"{args.tokens} tokens x {args.heads} heads x {args.head_dim}; bytes alone: fwd+bwd "
          f"{bytes_ms * 1e3:.0f} us, fwd {fwd_bytes / (args.bandwidth * 1e12) * 1e6:.0f} us")
    print(f"{'variant':<10} {'fwd+bwd us':>11} {'fwd us':>8} {'bwd us':>8} {'x bytes':>8} {'ms/step':>8} "
          f"{'max |d out|':>11} {'max |d grad|':>12} {'lambda grad':>11}")
    base = None
    for variant in args.variants:
        both, fwd, res = time_variant(variant, args.tokens, args.heads, args.head_dim, args.reps)
        base = base or res
        d_out = max((a.float() - b.float()).abs().max().item() for a, b in zip(res[:2], base[:2]))
        d_grad = (res[2].float() - base[2].float()).abs().max().item()
        d_lam = res[3][0].item()
        print(f"{variant:<10} {both * 1e3:>11.0f} {fwd * 1e3:>8.0f} {(both - fwd) * 1e3:>8.0f} "
              f"{both / bytes_ms:>8.2f} {both * PER_STEP:>8.1f} {d_out:>11.2e} {d_grad:>12.2e} "
              f"{d_lam:>11.3f}")


if __name__ == "__main__":
    main()
