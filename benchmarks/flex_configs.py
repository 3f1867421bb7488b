"""FlexAttention's tile configurations on the trainer's sliding-window block masks, forward + backward, one GPU.

    python benchmarks/flex_configs.py                         # stage-3 shapes: 49,152 tokens, windows 640/1408
    python benchmarks/flex_configs.py --autotune              # also let Inductor's max-autotune pick the tiles
    python benchmarks/flex_configs.py --config '{"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}'

Each row compiles `flex_attention` with one `kernel_options` dict (the first row: Inductor's defaults for this
GPU) and times forward + backward on the same q, k, v and the same masks the trainer builds
(speedrun.attention.sliding_block_mask over documents of random length, cut at max_seq_len), for the short
window, the long one and a paired-head layer (twice the sequence, twice the window). "per step" weights the
three by the record's layer mix (short 4, long 2, paired 4 of 10 attention layers) x 8 micro-batches.
"""

from __future__ import annotations

import argparse
import json

import torch

from speedrun.attention import sliding_block_mask

CANDIDATES = [
    {},
    {"ROWS_GUARANTEED_SAFE": True},  # every query sees at least itself
    {"BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64, "num_stages": 3, "num_warps": 4},
    {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "num_stages": 3, "num_warps": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
]
LAYER_MIX = {"short": 4, "long": 2, "paired": 4}


def random_segments(tokens: int, max_seq_len: int, mean_doc: int, seed: int) -> torch.Tensor:
    """(1, tokens) segment ids as speedrun.attention.segment_ids gives them: documents of exponential length."""
    g = torch.Generator().manual_seed(seed)
    lengths = (-mean_doc * torch.rand(tokens // 8 + 1, generator=g).log()).long().clamp_min(1)
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[:tokens]
    pos = torch.arange(tokens)
    new_doc = torch.ones(tokens, dtype=torch.bool)
    new_doc[1:] = doc[1:] != doc[:-1]
    first = torch.where(new_doc, pos, torch.zeros_like(pos)).cummax(0).values
    return (doc * (tokens + 1) + (pos - first) // max_seq_len).unsqueeze(0)


def time_config(options: dict, qkv: dict, masks: dict, reps: int) -> tuple[dict[str, float], dict]:
    """(us per shape, {shape: (output, q's gradient)}) for one kernel_options dict."""
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    torch._dynamo.reset()  # each options dict recompiles flex_attention: past the recompile limit otherwise
    attend = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    times, results = {}, {}
    for name, (q, k, v, grad) in qkv.items():
        def step():
            out = attend(q, k, v, block_mask=masks[name], scale=0.12, kernel_options=dict(options) or None)
            torch.autograd.backward(out, grad)
            return out
        q.grad = None
        results[name] = (step().detach().float(), q.grad.float())
        times[name] = do_bench(step, warmup=5, rep=reps, return_mode="median", grad_to_none=[q, k, v])
    return times, results


def max_difference(results: dict, base: dict) -> float:
    """The largest difference from the defaults' output or q gradient: an option that breaks the maths shows."""
    return max((a - b).abs().max().item() for name in results for a, b in zip(results[name], base[name]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=49152)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--windows", type=int, nargs=2, default=[640, 1408], metavar=("SHORT", "LONG"))
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=100, help="milliseconds of timing per shape")
    ap.add_argument("--config", action="append", default=[], help="a kernel_options dict as JSON (repeatable)")
    ap.add_argument("--autotune", action="store_true", help="add a row compiled under Inductor's max-autotune")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flex_configs.py times GPU kernels: run it on a machine with CUDA")
    seg = random_segments(args.tokens, args.max_seq_len, 700, 0).cuda()
    short, long = args.windows
    masks = {"short": sliding_block_mask(seg, short), "long": sliding_block_mask(seg, long),
             "paired": sliding_block_mask(seg, short, paired=True)}
    torch.manual_seed(0)
    qkv = {}
    for name in masks:
        T = 2 * args.tokens if name == "paired" else args.tokens
        H = args.heads // 2 if name == "paired" else args.heads
        shape = (1, H, T, args.head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        qkv[name] = (q, k, v, torch.randn(shape, device="cuda", dtype=torch.bfloat16))
    rows = [(json.dumps(c) if c else "defaults", c) for c in CANDIDATES + [json.loads(c) for c in args.config]]
    print(f"{'kernel_options':<80} {'short us':>9} {'long us':>9} {'paired us':>9} {'ms/step':>8} {'max diff':>9}")
    base = None

    def row(label: str, times: dict, results: dict) -> None:
        per_step = 8 * sum(LAYER_MIX[n] * t for n, t in times.items())
        print(f"{label:<80} {times['short'] * 1e3:>9.0f} {times['long'] * 1e3:>9.0f} {times['paired'] * 1e3:>9.0f} "
              f"{per_step:>8.1f} {max_difference(results, base):>9.2e}", flush=True)

    for label, options in rows:
        try:
            times, results = time_config(options, qkv, masks, args.reps)
        except Exception as exc:  # a tile that does not fit this GPU's shared memory, say
            print(f"{label:<80} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        base = base or results
        row(label, times, results)
    if args.autotune and base:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(max_autotune=True):
            row("max-autotune (the tiles it chose: its AUTOTUNE lines above)", *time_config({}, qkv, masks, args.reps))


if __name__ == "__main__":
    main()
