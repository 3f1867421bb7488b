"""Warm-up helpers (run.warmup_workers): processes that compile the later warm-up phases ahead of the trainer.

On the CPU the compile backend is aot_eager, which keeps no on-disk cache: these tests check the mechanism (the
helpers run their phases in their own processes, the trainer waits for them, the run is untouched, a dead helper
costs nothing but its phases), not the saving, which is GPU-only (README, "GPU speed")."""

import sys

import pytest
import torch
from torch._dynamo.utils import counters

from speedrun.train import _Trainer
from speedrun.warmup_helpers import assign
from conftest import fast_tiny

# three stage shapes (the MTP targets 3, 2, 1) and one validation shape besides the final one: five phases
FEW_PHASES = {"run.warmup_steps": 1, "schedule.short_windows": [3] * 4, "schedule.long_windows": [7] * 4,
              "schedule.final_long_window": 7}


def _warm_then_train(workers: int, monkeypatch=None, command=None, fresh: bool = True) -> tuple[list[str], list[float]]:
    """fresh: as a new process would be (dynamo's in-memory graphs and its count of them dropped)."""
    if fresh:
        torch._dynamo.reset()
        counters.clear()
    if command is not None:
        monkeypatch.setattr("speedrun.warmup_helpers.HELPER_COMMAND", command)
    lines: list[str] = []
    trainer = _Trainer(fast_tiny(8, **FEW_PHASES, **{"run.warmup_workers": workers}), None, lines.append,
                       compile_backend="aot_eager")
    assert len(trainer.warmup_phases()) == 5
    trainer.warmup()
    return lines, [trainer.train_step(s).item() for s in range(8)]


def test_phases_are_dealt_round_robin_after_the_trainers_first():
    assert assign(5, 2) == [[1, 3], [2, 4]]
    assert assign(3, 4) == [[1], [2]]  # no helper without a phase
    assert assign(1, 2) == []


@pytest.fixture(scope="module")
def alone() -> tuple[list[str], list[float]]:
    return _warm_then_train(0)


def test_helpers_compile_the_later_phases_ahead_and_the_run_is_unchanged(alone):
    (alone_log, alone), (helped_log, helped) = alone, _warm_then_train(2)
    ahead = [line for line in helped_log if "compiled ahead by a helper" in line]
    assert len(alone_log) == len(helped_log) == 5
    assert len(ahead) == 4 and "stage 1" not in " ".join(ahead)  # every phase after the trainer's first
    assert not any("helper" in line for line in alone_log)
    assert helped == pytest.approx(alone, abs=1e-6)
    assert helped[-1] < helped[0]


def test_a_helper_that_dies_leaves_its_phases_to_the_trainer(monkeypatch, alone):
    """The injected helper takes its spec, then exits without finishing a phase: the trainer must not wait for
    it, and compiles every phase itself."""
    dies = (sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(0.5); sys.exit(3)")
    log, losses = _warm_then_train(1, monkeypatch, dies)
    assert len(log) == 5 and not any("helper" in line for line in log)
    assert losses == pytest.approx(alone[1], abs=1e-6)


def test_a_process_that_compiled_already_starts_no_helpers():
    """A warm host's next trial (sweeps' --reuse-workers) has its graphs in memory: helpers would only delay it."""
    _warm_then_train(0)
    log, _ = _warm_then_train(2, fresh=False)
    assert len(log) == 5 and not any("helper" in line for line in log)


def test_out_of_memory_with_helpers_names_the_knob(monkeypatch):
    """Helpers hold memory on the trainer's GPU: an OOM in the warm-up (injected) says which knob to lower."""
    def oom(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    trainer = _Trainer(fast_tiny(8, **FEW_PHASES, **{"run.warmup_workers": 2}), None, None,
                       compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(_Trainer, "train_step", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"run.warmup_workers=1 or lower \(CUDA out of memory"):
        trainer.warmup()


def test_a_helper_trains_no_optimiser_state():
    """A helper's steps stop after the backward: no optimiser state or gradients held on the trainer's GPU (and no
    optimiser graphs compiled twice), while its forward and backward are the trainer's."""
    cfg = fast_tiny(8, **FEW_PHASES)
    helper, trainer = _Trainer(cfg, None, None, stand_in=(0, 1)), _Trainer(cfg, None, None)
    first = [helper.train_step(s).item() for s in range(3)]
    assert helper.opt.state == {} and all(p.grad is None for p in helper.model.parameters())
    assert first[0] == pytest.approx(trainer.train_step(0).item(), abs=1e-6)  # same weights, same batch
    assert trainer.opt.state
