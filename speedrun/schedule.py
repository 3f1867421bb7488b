"""The training schedule as pure functions of the step: stage, batch shape, windows, MTP weights, lr, momentum."""

from __future__ import annotations

from dataclasses import dataclass

from .config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class Stage:
    index: int
    start: int
    end: int  # exclusive
    tokens_per_step: int
    max_seq_len: int
    short_window: int  # in blocks of model.block_size tokens
    long_window: int
    lr_mult: float

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        """What a compiled graph depends on in this stage."""
        return (self.tokens_per_step, self.max_seq_len, self.short_window, self.long_window)


def stage_bounds(s: ScheduleConfig) -> list[tuple[int, int]]:
    starts = list(s.stage_starts) + [s.num_scheduled_steps]
    ends = starts[1:] + [s.total_steps]
    return list(zip(starts, ends))


def stage_index(s: ScheduleConfig, step: int) -> int:
    for k, (start, end) in enumerate(stage_bounds(s)):
        if start <= step < end:
            return k
    return s.num_stages - 1  # the final validation step (== total_steps) belongs to the last stage


def stage_at(s: ScheduleConfig, step: int) -> Stage:
    k = stage_index(s, step)
    start, end = stage_bounds(s)[k]
    return Stage(k, start, end, s.tokens_per_step[k], s.max_seq_lens[k], s.short_windows[k],
                 s.long_windows[k], s.stage_lr_mults[k])


def all_stages(s: ScheduleConfig) -> list[Stage]:
    return [stage_at(s, start) for start, end in stage_bounds(s) if end > start]


def stage_fraction(st: Stage, step: int) -> float:
    """How far through its stage a step is: 0 at the stage's first step, 1 at its last."""
    return 0.0 if st.end - st.start <= 1 else min(1.0, (step - st.start) / (st.end - st.start - 1))


def mtp_weights(s: ScheduleConfig, step: int) -> tuple[float, ...]:
    """Weights of the next-1, next-2, ... token losses, annealed linearly across the stage."""
    st = stage_at(s, step)
    a, b = s.mtp_start[st.index], s.mtp_end[st.index]
    frac = stage_fraction(st, step)
    return tuple(x + (y - x) * frac for x, y in zip(a, b))


def prefix_weight(s: ScheduleConfig, step: int) -> float | None:
    """The prefix-token loss's weight, annealed linearly across the stage; None where the stage has none."""
    if not s.prefix_start:
        return None
    st = stage_at(s, step)
    a, b = s.prefix_start[st.index], s.prefix_end[st.index]
    if a == 0 and b == 0:
        return None
    frac = stage_fraction(st, step)
    return a + (b - a) * frac


def lr_multiplier(s: ScheduleConfig, step: int) -> float:
    """Stage multiplier x (flat, then linear cooldown to final_lr_frac at num_scheduled_steps, then flat)."""
    n = s.num_scheduled_steps
    cooldown_start = round(n * (1 - s.cooldown_frac))
    if step < cooldown_start:
        decay = 1.0
    else:
        frac = min(1.0, (step - cooldown_start) / max(1, n - cooldown_start))
        decay = 1.0 + (s.final_lr_frac - 1.0) * frac
    return stage_at(s, step).lr_mult * decay


def muon_momentum(o: OptimConfig, s: ScheduleConfig, step: int) -> float:
    """Warm-up min->max over the first steps, max, then max->min over the last steps of the run."""
    hi, lo = o.muon_momentum, o.muon_momentum_min
    w, c, total = o.muon_momentum_warmup_steps, o.muon_momentum_cooldown_steps, s.total_steps
    if w > 0 and step < w:
        return lo + (hi - lo) * step / w
    if c > 0 and step > total - c:
        return hi + (lo - hi) * min(1.0, (step - (total - c)) / c)
    return hi
