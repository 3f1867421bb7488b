"""Warm-up helpers: compile a run's later warm-up phases in parallel processes while the trainer compiles the first.

A cold record run compiles one graph per stage shape and validation shape, one after the other, each mostly
single-threaded host work (dynamo, AOTAutograd, Inductor's code generation). `run.warmup_workers=N` starts N
helper processes next to the trainer, on the same device and the same compile caches (TORCHINDUCTOR_CACHE_DIR):
each builds the same trainer (the rank's micro-batch shapes, no process group), replays the warm-up up to its
phases and runs those (forward and backward only: the optimiser's graphs, compiled in the trainer's first
phase, and its state are the trainer's), so that when the trainer reaches a phase its graphs load from the
caches. Nothing a helper computes reaches the run. The trainer waits for a helper's phase before running it (a
cache hit then); a helper that dies costs only the parallelism: the trainer compiles its phases itself.

Protocol: the helper reads one JSON spec on stdin and writes a `done I` line on its stdout after each phase
(anything else the process prints goes to stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HELPER_COMMAND = (sys.executable, "-m", "speedrun.warmup_helpers")


@dataclass(frozen=True)
class WarmupPhase:
    """One warm-up phase: untimed train steps at a stage's shape, or one validation batch."""
    label: str
    steps: tuple[int, ...] = ()  # train steps to run (a stage phase)
    val_step: int | None = None  # validate as at this step (a validation phase)
    final: bool = False


def assign(n_phases: int, workers: int) -> list[list[int]]:
    """Phases 1.. dealt round-robin to `workers` helpers (phase 0, the optimiser's graphs too, is the trainer's)."""
    return [list(range(1 + w, n_phases, workers)) for w in range(min(workers, max(n_phases - 1, 0)))]


@dataclass
class HelperPool:
    """The running helpers and the phases they finished."""
    procs: list[subprocess.Popen] = field(default_factory=list)
    owner: dict[int, int] = field(default_factory=dict)  # phase -> helper index
    done: set[int] = field(default_factory=set)  # phases a helper finished
    ended: set[int] = field(default_factory=set)  # helpers whose output ended (exited or died)
    lock: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, cfg_dict: dict, rank: int, world: int, backend: str, workers: int, n_phases: int) -> "HelperPool":
        pool = cls()
        env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0"}
        for index, phases in enumerate(assign(n_phases, workers)):
            spec = {"config": cfg_dict, "rank": rank, "world": world, "backend": backend, "phases": phases}
            proc = subprocess.Popen(HELPER_COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            pool.procs.append(proc)
            pool.owner.update({p: index for p in phases})
            threading.Thread(target=pool._read, args=(index,), daemon=True).start()
        return pool

    def _read(self, index: int) -> None:
        for line in self.procs[index].stdout:
            word, _, phase = line.strip().partition(" ")
            if word == "done" and phase.isdigit():
                with self.lock:
                    self.done.add(int(phase))
                    self.lock.notify_all()
        with self.lock:  # after the last line it wrote: a helper that exits never hides a phase it finished
            self.ended.add(index)
            self.lock.notify_all()

    def wait_for(self, phase: int, limit_s: float = 1800.0) -> bool:
        """Block until the helper that owns `phase` finished it (True: its graphs are in the caches), died, or took
        `limit_s` (False: the trainer compiles the phase itself). Helpers take their phases in the trainer's
        order, and the trainer's first phase is its longest (it compiles the optimiser's graphs as well), so by
        the time the trainer asks, a helper has usually finished."""
        if phase not in self.owner:
            return False
        helper, deadline = self.owner[phase], time.monotonic() + limit_s
        with self.lock:
            while phase not in self.done and helper not in self.ended and time.monotonic() < deadline:
                self.lock.wait(timeout=1.0)
            return phase in self.done

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def main() -> int:
    spec = json.load(sys.stdin)
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed goes to stderr: stdout carries the protocol alone
    from .config import TrainConfig
    from .train import _Trainer
    cfg = TrainConfig.from_dict(spec["config"])
    trainer = _Trainer(cfg, None, None, compile_backend=spec["backend"], stand_in=(spec["rank"], spec["world"]))
    trainer.warm(trainer.warmup_phases(), only=set(spec["phases"]),
                 on_done=lambda i: print("done", i, file=protocol))
    return 0


if __name__ == "__main__":
    sys.exit(main())
