"""train(cfg, report) -> TrainResult: the speedrun training loop and its timing convention.

Warm-up runs a few real steps at every stage's shape (compiling on GPU), then the model, optimiser and
data loader are reset and the clock starts. The clock pauses for validation, which runs at step 0, every
`val_every` steps and at the end. Under torch.distributed (torchrun or Ray Train set RANK/WORLD_SIZE)
each rank takes every world_size-th micro-batch of the same global batch and gradients are summed, so
the run is the same for any world size. `report` is called on rank 0 only.
"""

from __future__ import annotations

import math
import os
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import schedule as S
from .config import TrainConfig
from .data import Batch, TrainLoader, batches_to_device, find_shards, to_device, val_batches
from .model import GPT
from .optim import SpeedrunOptimizer
from .prefix import load_ranks, prefix_table
from .sample import SAMPLE_TRAIN_PATTERN, SAMPLE_VAL_PATTERN, ensure_sample_corpus, sample_floor
from .warmup_helpers import HelperPool, WarmupPhase

Report = Callable[[dict], None]


@dataclass
class TrainResult:
    val_loss: float
    train_time_s: float
    steps: int
    tokens: int
    time_to_target_s: float | None
    peak_mem_bytes: int
    history: list[dict] = field(default_factory=list)  # one dict per validation
    status: str = "finished"  # finished | diverged
    compile_s: float = 0.0
    startup_s: float = 0.0
    val_time_s: float = 0.0
    floor: float | None = None  # the sample corpus's Bayes floor, when training on it
    world_size: int = 1

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"


def time_to_target(val_loss: float, train_time_s: float, target: float) -> float | None:
    """A run's time to the target: its training time at the end of its schedule, if its final validation loss
    is <= target; None otherwise. Mid-run validations come from an un-annealed model (on the record, a
    crossing interpolated between them lands ~0.5 s before the run's end): they never count."""
    return train_time_s if val_loss <= target else None


def micro_tokens_for(tokens_per_step: int, world: int, max_micro: int) -> int:
    """Largest per-forward size <= max_micro that splits this rank's share of the batch evenly."""
    if tokens_per_step % world:
        raise ValueError(f"tokens_per_step {tokens_per_step} is not divisible by world size {world}")
    per_rank = tokens_per_step // world
    accum = max(1, -(-per_rank // max_micro))
    while per_rank % accum:
        accum += 1
    return per_rank // accum


def resolve_data_dir(cfg: TrainConfig) -> Path:
    if cfg.data.source == "sample":
        return ensure_sample_corpus(cfg.data.data_dir or None)
    return Path(cfg.data.data_dir or os.environ.get("SPEEDRUN_DATA", "data/fineweb10B")).expanduser().resolve()


def data_patterns(cfg: TrainConfig) -> tuple[str, str]:
    if cfg.data.source == "sample":
        return SAMPLE_TRAIN_PATTERN, SAMPLE_VAL_PATTERN
    return cfg.data.train_pattern, cfg.data.val_pattern


class _Dist:
    """Rank/world and the few collectives the loop needs; a no-op group of one when not distributed."""

    def __init__(self, device: torch.device, stand_in: tuple[int, int] | None = None):
        """stand_in: (rank, world) of a rank this process stands in for, alone (a warm-up helper)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owned = False
        self.stand_in = stand_in is not None
        if stand_in is not None:
            self.on, (self.rank, self.world) = False, stand_in
            return
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True
        self.on = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        if not self.on or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_params(self, model: torch.nn.Module) -> None:
        if self.on:
            for p in model.parameters():
                dist.broadcast(p.data, 0)

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()


FLEX_TILE = 128  # FlexAttention's compiled kernel tiles queries and keys in blocks that must divide the mask's


def fast_path_kernels(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """(FlexAttention, FP8 matmuls) for this config on this device: the GPU fast path, or the portable one.
    `auto` takes FlexAttention when compiling on a GPU and the window unit (model.block_size) is whole tiles of
    its kernel; otherwise the blocked SDPA path (the tiny preset's 16-token blocks)."""
    cuda, compiled = device.type == "cuda", device.type == "cuda" and cfg.run.compile
    kernel, whole_tiles = cfg.model.attn_kernel, cfg.model.block_size % FLEX_TILE == 0
    flex = kernel == "flex" or (kernel == "auto" and compiled and whole_tiles)
    if flex and not compiled:
        raise ValueError("model.attn_kernel=flex needs run.compile=true on a CUDA device (eager flex attention "
                         "materialises every score)")
    if flex and not whole_tiles:
        raise ValueError(f"model.attn_kernel=flex needs model.block_size a multiple of {FLEX_TILE} (its kernel's "
                         f"tiles), not {cfg.model.block_size}: use model.attn_kernel=auto or sdpa")
    return flex, cuda and cfg.model.use_fp8


def configure_compiler() -> None:
    """Each stage's shape (and train/validation) is its own graph: more than dynamo's default 8.
    Inductor's mixed-order reduction fusion is off unless TORCHINDUCTOR_MIX_ORDER_REDUCTION=1: on torch 2.11 it
    failed an internal assertion ("32768 v.s. 32767") compiling the stage-1 shape on an H100.
    AOTAutograd's cache takes graphs that hold custom autograd.Functions (the FP8 matmuls and head): by default
    it bypasses them, and every warm start re-traced and re-partitioned the whole training graph (the
    partitioner alone: 5.5 s of a profiled warm start on the H100).
    Dynamo inlines the Functions' forward and backward into the graph the cache key hashes, so an edit to them
    still misses."""
    import torch._dynamo.config as dc
    import torch._functorch.config as fc
    import torch._inductor.config as ic
    if hasattr(ic.triton, "mix_order_reduction"):
        ic.triton.mix_order_reduction = os.environ.get("TORCHINDUCTOR_MIX_ORDER_REDUCTION") == "1"
    if hasattr(fc, "autograd_cache_allow_custom_autograd_functions"):
        fc.autograd_cache_allow_custom_autograd_functions = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 64))
    if hasattr(dc, "accumulated_recompile_limit"):
        dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 1024)


def _compiled_in_this_process() -> bool:
    from torch._dynamo.utils import counters
    return bool(counters["stats"]["unique_graphs"])


def _pick_device(cfg: TrainConfig) -> torch.device:
    want = cfg.run.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible: use run.device=cpu")
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # stage shapes change
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


class _Trainer:
    def __init__(self, cfg: TrainConfig, report: Report | None, log: Callable[[str], None] | None,
                 report_all_ranks: bool = False, compile_backend: object = None,
                 stand_in: tuple[int, int] | None = None):
        """compile_backend: compile with this torch.compile backend on any device (tests count compilations).
        stand_in: (rank, world) whose shapes this process takes without joining a group (warm-up helpers)."""
        self.t_enter = time.perf_counter()
        self.cfg = cfg
        self.device = _pick_device(cfg)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.dist = _Dist(self.device, stand_in)
        self.is_main = self.dist.rank == 0
        self.report = report if (self.is_main or report_all_ranks) else None
        self.log = log if self.is_main else None
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and cfg.run.dtype == "bfloat16" else torch.float32

        data_dir = resolve_data_dir(cfg)
        train_pattern, val_pattern = data_patterns(cfg)
        self.train_paths = find_shards(data_dir, train_pattern)
        self.val_paths = find_shards(data_dir, val_pattern)
        self.floor = sample_floor(data_dir, cfg.data.val_tokens) if cfg.data.source == "sample" else None
        val_micro = min(cfg.data.val_micro_batch_tokens, cfg.data.val_tokens)
        self.val = batches_to_device(val_batches(self.val_paths, cfg.data.val_tokens, val_micro, self.dist.rank,
                                                 self.dist.world, pad_id=cfg.data.bos_id), self.device)

        # read before anything heavy, so that a missing vocabulary fails at once (record #89 builds this table
        # inside its timed region; here it is part of start-up, ~0.1 s for GPT-2's)
        prefixes = prefix_table(load_ranks(cfg.model.prefix_vocab), cfg.model.padded_vocab_size) \
            if cfg.model.prefix_vocab else None
        torch.manual_seed(cfg.run.seed)
        with self.device:  # built where it trains: on a GPU, no host-side init of ~400M parameters and no copy
            self.model = GPT(cfg.model)
        if prefixes is not None:
            self.model.prefix_table.copy_(prefixes)
        self.dist.broadcast_params(self.model)
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.compiled = compile_backend is not None or (self.device.type == "cuda" and cfg.run.compile)
        backend = "inductor" if compile_backend is None else compile_backend
        self.backend_name = backend if isinstance(backend, str) else None  # helpers can compile with it
        self.flex, fp8 = fast_path_kernels(cfg, self.device)
        self.model.set_fast_path(self.flex, fp8)
        self._window_tensors: dict[tuple[int, int], torch.Tensor] = {}
        self.forward = self.model
        self.val_mtp = torch.ones(1, device=self.device)  # validation: the next-token loss alone
        if self.compiled:
            configure_compiler()
            self.forward = torch.compile(self.model, dynamic=False, fullgraph=True, backend=backend)
        self.optimizer_compile = backend if self.compiled else False
        self._reset()
        self.init_s = time.perf_counter() - self.t_enter

    def _reset(self) -> None:
        """Fresh weights (the seeded init), no gradients, optimiser, rotary state and data position."""
        self.model.load_state_dict(self.initial_state)
        # Adam steps every optim.adam_every steps on the gradients accumulated since its last step: a warm-up
        # that ends between two Adam steps would otherwise hand its gradients to the run's first Adam step
        self.model.zero_grad(set_to_none=True)
        self.model.tied = self.cfg.model.untie_step != -1
        self.model.rotary.reset()
        for scales in self.model.delayed_fp8_scales():
            scales.next.zero_()
        self.opt = SpeedrunOptimizer(self.model, self.cfg.optim, compile=self.optimizer_compile)
        self.loader = TrainLoader(self.train_paths, self.cfg.data.bos_id, self.dist.rank, self.dist.world)
        self._prefetched = None  # (shape, loader state before it, host rows) of the next step's batch
        self.adam_accum = 0
        self.long_window = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _set_windows(self, long_blocks: int) -> None:
        bs = self.cfg.model.block_size
        if self.long_window is not None and self.cfg.model.use_yarn:
            self.model.rotary.yarn_extend(self.long_window * bs, long_blocks * bs)
        self.long_window = long_blocks

    def _windows(self, short: int, long: int):
        """(short, long) in tokens; for FlexAttention a device tensor (cached), which the compiled forward takes as
        an input: windows that grow over the run (public-2508: 14 sizes) then share one graph per shape."""
        bs = self.cfg.model.block_size
        if not self.flex:
            return short * bs, long * bs
        key = (short, long)
        if key not in self._window_tensors:
            self._window_tensors[key] = torch.tensor([short * bs, long * bs], dtype=torch.int32).to(self.device)
        return self._window_tensors[key]

    def _loss(self, batch, stage: S.Stage, mtp: torch.Tensor, short: int, long: int,
              prefix_weight: torch.Tensor | None = None, max_seq_len: int | None = None) -> torch.Tensor:
        """batch: already on the device. max_seq_len: documents are cut into pieces of at most
        this many tokens (default: the stage's)."""
        with self._autocast():
            return self.forward(batch.inputs, batch.targets,
                                mtp, self._windows(short, long), max_seq_len or stage.max_seq_len,
                                self.cfg.data.bos_id, self.dtype, prefix_weight)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step; returns the global mean training loss (next-k weighted) as a tensor."""
        cfg, sch = self.cfg, self.cfg.schedule
        stage = S.stage_at(sch, step)
        if self.long_window != stage.long_window:
            self._set_windows(stage.long_window)
        self._untie_at(step)
        for scales in self.model.delayed_fp8_scales():
            scales.bootstrap.fill_(step < cfg.model.fp8_bootstrap_steps)
        micro = micro_tokens_for(stage.tokens_per_step, self.dist.world, cfg.data.max_micro_batch_tokens)
        rows = self._host_rows(stage.tokens_per_step, micro).to(self.device, non_blocking=True)
        batches = [Batch(row[0:1], row[1:2]) for row in rows]
        n_chunks = stage.tokens_per_step // micro
        mtp = to_device(torch.tensor(S.mtp_weights(sch, step), dtype=torch.float32), self.device)
        pw = S.prefix_weight(sch, step) if self.model.prefix_table is not None else None
        pw = None if pw is None else to_device(torch.tensor(pw, dtype=torch.float32), self.device)
        total = torch.zeros((), device=self.device)
        for batch in batches:
            loss = self._loss(batch, stage, mtp, stage.short_window, stage.long_window, pw)
            (loss / n_chunks).backward()
            total += loss.detach()
        if self.dist.stand_in:  # a warm-up helper compiles the model's graphs; the optimiser's are the trainer's
            self.model.zero_grad(set_to_none=True)
            return total / n_chunks
        self.model.fold_tied_grad()
        last = sch.total_steps - 1
        adam_due = self.opt.adam_due(step, last)
        self.adam_accum += 1
        grads = [p.grad for p in self.opt.muon_params() if p.grad is not None]
        if adam_due:
            grads += [p.grad for p in self.opt.adam_params() if p.grad is not None]
        self.dist.sum_(grads + [total])
        self.opt.step(S.lr_multiplier(sch, step), S.muon_momentum(cfg.optim, sch, step), adam_due,
                      1.0 / self.adam_accum)
        self.model.share_tied_weights()
        self.opt.zero_grad(adam_too=adam_due)
        if adam_due:
            self.adam_accum = 0
        if step + 1 < sch.total_steps:  # the host's share of the next step, while the GPU works through this one
            nxt = S.stage_at(sch, step + 1)
            self._prefetch(nxt.tokens_per_step,
                           micro_tokens_for(nxt.tokens_per_step, self.dist.world, cfg.data.max_micro_batch_tokens))
        return total / n_chunks

    def _untie_at(self, step: int) -> None:
        if step == self.cfg.model.untie_step and self.model.tied:
            self.model.untie()
            self.opt.copy_state(self.model.lm_head.weight, self.model.embed.weight)

    def _prefetch(self, tokens_per_step: int, micro: int) -> None:
        """Cut the next step's batch now: after a synchronisation (logging, validation) the GPU would otherwise
        sit idle while the host reads and copies it at the start of the step."""
        state = self.loader.state()
        rows = self.loader.next_step_rows(tokens_per_step, micro, pin=self.device.type == "cuda")
        self._prefetched = ((tokens_per_step, micro), state, rows)

    def _host_rows(self, tokens_per_step: int, micro: int) -> torch.Tensor:
        """This step's batch on the host: the prefetched one if it was cut for this shape, else read now (after
        rewinding the loader past a prefetch of another shape, so that the data order never depends on it)."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            if prefetched[0] == (tokens_per_step, micro):
                return prefetched[2]
            self.loader.restore(prefetched[1])
        return self.loader.next_step_rows(tokens_per_step, micro, pin=self.device.type == "cuda")

    def validate(self, step: int, final: bool, batches: int | None = None) -> float:
        """The validation loss at `step` (`batches`: only the first few of this rank's batches, for the warm-up)."""
        # On the compiled FlexAttention path the validation loss runs under autograd (never differentiated):
        # torch 2.11's Inductor fails to lower FlexAttention in an inference graph whose block masks are built
        # inside it ("convert FlexibleLayout to FixedLayout first").
        autograd = self.compiled and self.flex
        with torch.set_grad_enabled(autograd):
            return self._validate(step, final, toggle_eval=not autograd, batches=batches)

    def _validate(self, step: int, final: bool, toggle_eval: bool, batches: int | None) -> float:
        sch = self.cfg.schedule
        stage = S.stage_at(sch, min(step, sch.total_steps - 1))
        long = stage.long_window
        saved_rotary = (self.model.rotary.freq.clone(), self.model.rotary.attn_scale.clone())
        saved_fp8 = [scales.next.clone() for scales in self.model.delayed_fp8_scales()]  # validation leaves none
        if final and sch.final_long_window != long:
            self._set_windows(sch.final_long_window)
            long = sch.final_long_window
        if toggle_eval:
            self.model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in self.val[:batches]:
            # whole documents, as record #89 validates (its eval attention takes the forward's length as the
            # longest sequence); training cuts them at the stage's max_seq_len
            loss = self._loss(batch, stage, self.val_mtp, stage.short_window, long,
                              max_seq_len=batch.inputs.size(1)).detach()
            totals[0] += loss.double() * batch.targets.numel()  # the loss is a mean over every position ...
            totals[1] += (batch.targets >= 0).sum()  # ... of which the filler's (target -1) add nothing
        if toggle_eval:
            self.model.train()
        for scales, saved in zip(self.model.delayed_fp8_scales(), saved_fp8):
            scales.next.copy_(saved)
        if final:
            self.model.rotary.freq.copy_(saved_rotary[0])
            self.model.rotary.attn_scale.copy_(saved_rotary[1])
            self.long_window = stage.long_window
        self.dist.sum_([totals])
        return (totals[0] / totals[1]).item()

    def warmup_phases(self) -> list[WarmupPhase]:
        """Every distinct stage shape's untimed steps, then one batch of each validation shape the run meets:
        one on the FlexAttention path (windows are tensors there); off it, each stage's windows and the final."""
        n, sch, phases = self.cfg.run.warmup_steps, self.cfg.schedule, []
        if not n:
            return phases
        seen = set()
        for stage in S.all_stages(sch):
            shape = (stage.tokens_per_step, stage.max_seq_len, stage.short_window, stage.long_window,
                     len(S.mtp_weights(sch, stage.start)),
                     S.prefix_weight(sch, stage.start) is None)  # the prefix loss: another graph
            if shape not in seen:
                seen.add(shape)
                phases.append(WarmupPhase(
                    f"stage {stage.index + 1} ({stage.tokens_per_step} tokens/step, seq {stage.max_seq_len}, "
                    f"windows {stage.short_window}/{stage.long_window})",
                    steps=tuple(stage.start + i if stage.start + i < stage.end else stage.start for i in range(n))))
        val_windows = set()
        for stage in S.all_stages(sch):
            if (stage.short_window, stage.long_window) not in val_windows:
                val_windows.add((stage.short_window, stage.long_window))
                phases.append(WarmupPhase(f"validation, windows {stage.short_window}/{stage.long_window}",
                                          val_step=stage.start))
        phases.append(WarmupPhase("final validation", val_step=sch.total_steps, final=True))
        return phases

    def warm(self, phases: list[WarmupPhase], only: set[int] | None = None,
             before: Callable[[int], bool] | None = None, on_done: Callable[[int], None] | None = None) -> None:
        """Run the warm-up phases in order (`only`: just these; for the others, only the untie their steps make,
        so that every phase compiles the graphs it compiles in the full sequence). `before(i)`: True when a
        helper compiled phase i ahead (said in its log line)."""
        for i, phase in enumerate(phases):
            if only is not None and i not in only:
                for step in phase.steps:
                    self._untie_at(step)
                continue
            ahead = before(i) if before else False
            with self._timed_warmup(phase.label + (" (compiled ahead by a helper)" if ahead else "")):
                for step in phase.steps:
                    self.train_step(step)
                if phase.val_step is not None:
                    self.validate(phase.val_step, final=phase.final, batches=1)
            if on_done:
                on_done(i)

    def warmup(self) -> float:
        """Untimed steps at every distinct stage shape (compiles on GPU), then reset everything. Logs the seconds
        each shape and each validation shape took (on a GPU, mostly compiling). With run.warmup_workers, helper
        processes compile the later phases meanwhile (speedrun.warmup_helpers)."""
        t0 = time.perf_counter()
        phases = self.warmup_phases()
        workers = self.cfg.run.warmup_workers if self.compiled and self.backend_name else 0
        if workers and _compiled_in_this_process():
            workers = 0  # a warm host's next trial: its own in-memory graphs serve every phase at once
        pool = HelperPool.start(self.cfg.to_dict(), self.dist.rank, self.dist.world, self.backend_name, workers,
                                len(phases)) if workers and len(phases) > 1 else None
        try:
            self.warm(phases, before=pool.wait_for if pool else None)
        except torch.OutOfMemoryError as e:
            if not pool:
                raise
            raise torch.OutOfMemoryError(f"out of GPU memory in the warm-up, with {len(pool.procs)} warm-up helper "
                                         f"process(es) on this GPU: set run.warmup_workers={len(pool.procs) - 1} "
                                         f"or lower ({str(e).splitlines()[0] if str(e) else 'CUDA OOM'})") from e
        finally:
            if pool:
                pool.close()
        if phases:
            self._reset()
        return time.perf_counter() - t0

    @contextmanager
    def _timed_warmup(self, what: str):
        t = time.perf_counter()
        yield
        self._sync()
        if self.log:
            self.log(f"warm-up: {what}: {time.perf_counter() - t:.1f} s")

    def run(self) -> TrainResult:
        cfg, sch = self.cfg, self.cfg.schedule
        compile_s = self.warmup()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        startup_s = time.perf_counter() - self.t_enter
        if self.report:
            self.report({"step": 0, "compile_s": compile_s, "startup_s": startup_s, "init_s": self.init_s,
                         "train_time_s": 0.0, "tokens": 0, "world_size": self.dist.world})
        history: list[dict] = []
        train_time = val_time = 0.0
        tokens = 0
        status = "finished"
        total_steps = sch.total_steps
        bad = torch.zeros((), device=self.device)
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
        self._sync()
        t_start = time.perf_counter()
        step = 0
        for step in range(total_steps + 1):
            last = step == total_steps
            if last or step % cfg.run.val_every == 0:
                self._sync()
                train_time += time.perf_counter() - t_start
                v0 = time.perf_counter()
                val_loss = self.validate(step, final=last)
                val_time += time.perf_counter() - v0
                entry = {"step": step, "val_loss": val_loss, "train_time_s": train_time, "tokens": tokens}
                history.append(entry)
                if self.log:
                    self.log(f"step:{step}/{total_steps} val_loss:{val_loss:.4f} train_time:{train_time * 1000:.0f}ms "
                             f"step_avg:{train_time * 1000 / max(step, 1):.2f}ms")
                if self.report:
                    self.report({**entry, "val_time_s": val_time})
                if not math.isfinite(val_loss):
                    status = "diverged"
                    break
                self._sync()
                t_start = time.perf_counter()
            if last:
                break
            loss = self.train_step(step)
            tokens += S.stage_at(sch, step).tokens_per_step
            bad = torch.maximum(bad, (~torch.isfinite(loss)).float())
            loss_sum += torch.nan_to_num(loss.detach(), nan=0.0, posinf=0.0)
            loss_n += 1
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == total_steps:
                if bad.item():  # every rank sees the same summed loss, so all stop together
                    self._sync()
                    train_time += time.perf_counter() - t_start
                    status = "diverged"
                    if self.log:
                        self.log(f"step:{step + 1}/{total_steps} diverged: non-finite training loss")
                    break
                if self.report or self.log:
                    self._sync()
                    now = train_time + time.perf_counter() - t_start
                    train_loss = (loss_sum / loss_n).item()
                    if self.report:
                        self.report({"step": step + 1, "train_time_s": now, "tokens": tokens, "train_loss": train_loss})
                    if self.log:
                        self.log(f"step:{step + 1}/{total_steps} train_loss:{train_loss:.4f} "
                                 f"train_time:{now * 1000:.0f}ms step_avg:{now * 1000 / (step + 1):.2f}ms")
                loss_sum.zero_()
                loss_n = 0
        val_loss = history[-1]["val_loss"] if status == "finished" else float("nan")
        steps_done = history[-1]["step"] if status == "finished" else step + 1
        peak = (torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return TrainResult(
            val_loss=val_loss, train_time_s=train_time, steps=steps_done, tokens=tokens,
            time_to_target_s=time_to_target(val_loss, train_time, cfg.run.target_loss), peak_mem_bytes=int(peak),
            history=history, status=status, compile_s=compile_s, startup_s=startup_s, val_time_s=val_time,
            floor=self.floor, world_size=self.dist.world,
        )


def train(cfg: TrainConfig, report: Report | None = None, log: Callable[[str], None] | None = None,
          report_all_ranks: bool = False) -> TrainResult:
    """Train with `cfg`; `report(metrics)` after each validation and every log_every steps, on rank 0 only
    unless report_all_ranks (Ray Train V2's report is collective: every rank must call it, with the same
    metrics, which the loop's all-reduced losses guarantee). `log(line)` gets the speedrun's log lines."""
    trainer = _Trainer(cfg, report, log, report_all_ranks)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()
