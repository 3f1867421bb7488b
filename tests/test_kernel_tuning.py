"""The choice of a kernel build per shape (speedrun.kernel_tuning), with a wall-clock timer on the CPU."""

import time

import pytest

from speedrun.kernel_tuning import FastestBuild


def wall(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def test_the_fastest_build_is_kept_per_shape_and_failing_builds_drop_out():
    calls = []

    def build(name, seconds, fail=False):
        def run():
            calls.append(name)
            if fail:
                raise RuntimeError("out of shared memory")
            time.sleep(seconds)
        return run

    tuning = FastestBuild("test", "NO_SUCH_LOG_VARIABLE", "turn it off", timer=wall)
    candidates = {"slow": build("slow", 0.05), "fast": build("fast", 0.001), "broken": build("broken", 0, fail=True)}
    assert tuning.pick(("up", 128), candidates) == "fast"
    assert sorted(calls) == ["broken", "fast", "slow"]
    assert tuning.pick(("up", 128), candidates) == "fast" and len(calls) == 3  # timed once per shape
    assert tuning.pick(("up", 256), {"slow": build("slow", 0.05)}) == "slow"


def test_a_shape_no_build_runs_says_how_to_turn_the_kernel_off():
    def broken():
        raise RuntimeError("no TMA")

    tuning = FastestBuild("fused MLP", "NO_SUCH_LOG_VARIABLE", "set model.fused_mlp=false", timer=wall)
    with pytest.raises(RuntimeError, match="no build of the fused MLP kernel ran .* set model.fused_mlp=false"):
        tuning.pick(("down", 64), {"a": broken, "b": broken})
