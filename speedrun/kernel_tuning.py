"""Which build of a Triton kernel runs a given shape: every candidate is timed once per shape on this machine
and the fastest is kept; a candidate that fails there (too much shared memory, no TMA, a lowering error) drops
out. Shared by the head's gradient pass (head_kernels) and the fused MLP products (mlp_kernels)."""

from __future__ import annotations

import os
from typing import Callable, Hashable


def _do_bench(run: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(run, warmup=5, rep=20, return_mode="median")


class FastestBuild:
    """One per kernel family. `pick(key, candidates)` returns the name of the fastest candidate for `key` (a shape),
    timing them only the first time that key is seen; `log_env` set in the environment prints the timings."""

    def __init__(self, what: str, log_env: str, hint: str, timer: Callable[[Callable[[], object]], float] = _do_bench):
        self.what, self.log_env, self.hint, self.timer = what, log_env, hint, timer
        self.choice: dict[Hashable, Hashable] = {}

    def pick(self, key: Hashable, candidates: dict[Hashable, Callable[[], object]]) -> Hashable:
        if key not in self.choice:
            log = bool(os.environ.get(self.log_env))
            times = {}
            for name, run in candidates.items():
                try:
                    times[name] = self.timer(run)
                except Exception as e:  # noqa: BLE001 (Triton raises its own types for resources and lowering)
                    if log:
                        print(f"{self.what} {name} dropped: {type(e).__name__}: {str(e)[:200]}")
            if not times:
                raise RuntimeError(f"no build of the {self.what} kernel ran for shape {key}; {self.hint}")
            self.choice[key] = min(times, key=times.get)
            if log:
                print(self.what, key, "ms:", {str(k): round(v, 4) for k, v in sorted(times.items(), key=lambda kv: kv[1])})
        return self.choice[key]
