"""Shared fixtures: a private sample-corpus cache and a fast tiny config for unit-level training runs."""

import os

import pytest

from speedrun.config import TrainConfig


@pytest.fixture(scope="session", autouse=True)
def sample_cache(tmp_path_factory):
    """Tests make the sample corpus themselves, in their own cache folder."""
    path = os.environ.get("SPEEDRUN_TEST_CACHE") or str(tmp_path_factory.mktemp("speedrun-cache"))
    os.environ["SPEEDRUN_CACHE"] = path
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray as the sweep CLI starts one (sweeps.run.execute): the machine's CPUs doubled as logical
    CPUs, so a worker reservation that Ray leaks after a stop cannot stall the next trial; shared by a module's
    sweeps (one cluster at a time). Concurrency still comes from the machine's real CPUs."""
    import ray
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # Ray Train reports block ~2 s otherwise
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from sweeps.run import local_ray_cpus
    ray.init(num_cpus=local_ray_cpus(), log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def fast_tiny(steps: int = 16, **overrides) -> TrainConfig:
    """The tiny preset compressed to a few small steps: every schedule phase occurs, seconds per run."""
    cfg = TrainConfig.preset("tiny").with_total_steps(steps)
    base = {"schedule.tokens_per_step": [512] * 4, "data.max_micro_batch_tokens": 512, "data.val_tokens": 2048,
            "run.warmup_steps": 0, "run.val_every": 1000, "run.log_every": 2}
    base.update(overrides)
    return cfg.override(base)
