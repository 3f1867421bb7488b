"""Shared fixtures: a private sample-corpus cache and a fast tiny config for unit-level training runs.

The suite runs on two pytest-xdist workers (`pytest -n 2`, README and .ci/run). Every test module that starts Ray
(the local_ray fixture, or sweep drivers in subprocesses) is listed in RAY_MODULES: their tests run first, one
after another on one worker, so that there is never more than one Ray cluster on the machine (two stall each
other's trials, docs/ARCHITECTURE.md); the other tests run on the other worker meanwhile. (pytest-xdist's own
`--dist loadgroup` cannot be used: it renames node ids in a way pytest 9.2 no longer honours.)"""

import os
from pathlib import Path

import pytest

from speedrun.config import TrainConfig

# Sweep/record CLI flags that keep the Ray tests' trials short: a 4,096-token validation (the tiny preset's
# 32,768 took most of a 12-step trial's time) and, where a test does not look at it, no warm-up.
QUICK_VAL = ["--set", "data.val_tokens=4096"]
QUICK = ["--set", "run.warmup_steps=0", *QUICK_VAL]

RAY_MODULES = ("test_faults.py", "test_record.py", "test_resume.py", "test_sweep.py", "test_tracking.py",
               "test_concurrent_sweeps.py", "test_resume_schedulers.py",
               "test_script_sweep.py", "test_leaks.py", "test_script_record.py", "test_storage.py",
               "test_cluster.py", "test_trial_hosts.py")


def is_ray_module(path: str) -> bool:
    return os.path.basename(path) in RAY_MODULES


def pytest_configure(config):
    """Under xdist, one intra-op thread per worker: two workers on two cores, each with an OpenMP pool of two
    threads beside Inductor's compile workers, left a CPU training step spinning for more than 10 minutes
    (seen with tests/test_train.py running beside tests/test_compile.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses tests start
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The Ray modules first (they are the long path), each module's tests still together and in order; and no
    test outside RAY_MODULES may use the local Ray (under xdist it could run beside a Ray test)."""
    for item in items:
        for ray_fixture in ("local_ray", "shared_sweep"):
            if ray_fixture in item.fixturenames and not is_ray_module(str(item.path)):
                raise pytest.UsageError(f"{item.nodeid} uses {ray_fixture}: add its module to conftest.RAY_MODULES")
    items[:] = sorted(items, key=lambda item: not is_ray_module(str(item.path)))  # stable: order kept otherwise


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # plain pytest: everything runs in one process anyway
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class RayOnOneWorker(LoadScopeScheduling):
        """All tests of RAY_MODULES are one unit of work (one worker, in collection order); every other test is a
        unit of its own, sent to whichever worker is free."""

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if is_ray_module(nodeid.split("::", 1)[0]) else nodeid

    def pytest_xdist_make_scheduler(config, log):
        return RayOnOneWorker(config, log)


@pytest.fixture(scope="session", autouse=True)
def sample_cache(tmp_path_factory):
    """Tests make the sample corpus themselves, in their own cache folder."""
    path = os.environ.get("SPEEDRUN_TEST_CACHE") or str(tmp_path_factory.mktemp("speedrun-cache"))
    os.environ["SPEEDRUN_CACHE"] = path
    return path


QUICK_STEPS = 12


@pytest.fixture(scope="session", autouse=True)
def quick_track(sample_cache, tmp_path_factory):
    """A track for the Ray tests' short trials (the tiny preset, 12 steps, 4,096 validation tokens of the
    sample corpus this session makes), added through $SPEEDRUN_TRACKS as a contributor's own track would be.
    Its target (3.8) is reached within 12 steps and its record time (1e6 s) by every run: trials are candidates
    unless a test overrides it."""
    from speedrun.data import find_shards, val_fingerprint
    from speedrun.sample import SAMPLE_VAL_PATTERN, ensure_sample_corpus

    sha = val_fingerprint(find_shards(ensure_sample_corpus(None), SAMPLE_VAL_PATTERN), 4096)
    path = tmp_path_factory.mktemp("tracks") / "tracks.toml"
    path.write_text(f"""[quick]
description = "tests: tiny preset, {QUICK_STEPS} steps, 4,096 validation tokens"
data_source = "sample"
val_pattern = "{SAMPLE_VAL_PATTERN}"
val_tokens = 4096
step_budget = {QUICK_STEPS}
val_sha256 = "{sha}"
target_loss = 3.8
record_time_s = 1e6
time_noise = 0.5
record_runs = 3
source = "tests/conftest.py"
exchange_rate = 0.2658
noise = 0.01
""")
    os.environ["SPEEDRUN_TRACKS"] = str(path)
    return path


@pytest.fixture(scope="session")
def shared_sweep(quick_track, tmp_path_factory):
    """The one muon_lr sweep that test_sweep.py and test_tracking.py both read (one sweep instead of one per
    module): 2 trials of 12 steps side by side, no early stopping, the time objective against the quick track,
    a --set of a step-valued knob. The sweep driver starts its own local Ray unless a module's is running."""
    import contextlib
    import io
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from sweeps import run as sweep_cli

    tmp = tmp_path_factory.mktemp("shared_sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--trials", "2", "--steps", str(QUICK_STEPS),
                             "--scheduler", "none", "--objective", "time", "--cpus-per-worker", "0.5",
                             "--set", "optim.muon_momentum_warmup_steps=5", "--storage", str(tmp), "--name", "s",
                             "--tracking-uri", uri, *QUICK])
    assert rc == 0, out.getvalue()[-3000:]
    rows = pq.read_table(tmp / "s" / "results.parquet").to_pylist()
    return SimpleNamespace(folder=tmp, rows=rows, out=out.getvalue(), uri=uri, name="s")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray as the sweep CLI starts one (sweeps.run.execute): the machine's CPUs doubled as logical
    CPUs, so a worker reservation that Ray leaks after a stop cannot stall the next trial; shared by a module's
    sweeps (one cluster at a time). Concurrency still comes from the machine's real CPUs."""
    import ray
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # Ray Train reports block ~2 s otherwise
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from sweeps.cluster import local_ray_options
    ray.init(log_to_driver=False, logging_level="WARNING", **local_ray_options())
    yield ray
    ray.shutdown()


def numeral_vocab() -> str:
    """The record model's prefix-token vocabulary where GPT-2's cannot be downloaded (speedrun.prefix's stand-in),
    written once per test process."""
    import tempfile

    from speedrun.prefix import write_numeral_vocab

    path = Path(tempfile.gettempdir()) / f"speedrun-numerals-{os.getpid()}.tiktoken"
    return str(path) if path.exists() else write_numeral_vocab(path)


def fast_tiny(steps: int = 16, **overrides) -> TrainConfig:
    """The tiny preset compressed to a few small steps: every schedule phase occurs, seconds per run."""
    cfg = TrainConfig.preset("tiny").with_total_steps(steps)
    base = {"schedule.tokens_per_step": [512] * 4, "data.max_micro_batch_tokens": 512, "data.val_tokens": 2048,
            "run.warmup_steps": 0, "run.val_every": 1000, "run.log_every": 2}
    base.update(overrides)
    return cfg.override(base)


OPTUNA_STATE = {"finished": "COMPLETE", "diverged": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}


def assert_study_matches(folder, name: str, rows: list[dict], value_key: str):
    """The sweep's persisted Optuna study, opened as a user would, agrees with results.parquet: one Optuna trial
    per sweep trial (the latest, where an interrupted one was restarted), its state, params and value. No trial
    is left RUNNING. Returns the study."""
    import optuna

    from sweeps.search import study_storage

    study = optuna.load_study(study_name=name, storage=study_storage(Path(folder)))
    assert not [t.number for t in study.trials if t.state.name == "RUNNING"]
    latest = {}
    for t in sorted(study.trials, key=lambda t: t.number):
        latest[t.user_attrs["trial_index"]] = t
    assert sorted(latest) == sorted(r["trial_index"] for r in rows)
    for r in rows:
        t = latest[r["trial_index"]]
        assert t.state.name == OPTUNA_STATE[r["status"]], (r["trial_index"], r["status"], t.state)
        for key, value in t.params.items():
            assert r[key] == pytest.approx(value)
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(r[value_key])
    return study


def ray_state_report(folder: Path) -> str:
    """What a stalled sweep's local Ray holds: free and total resources, live placement groups and actors, and the
    last line of each trial's log (printed by `report_if_stalled` before a test's own timeout kills it)."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    have, total = ray.available_resources(), ray.cluster_resources()
    lines = [f"available {k} {have.get(k, 0)} of {total[k]}" for k in ("CPU", "GPU") if k in total]
    for pg in list_placement_groups(limit=1000, detail=True):
        if pg.state != "REMOVED":
            lines.append(f"placement group {pg.placement_group_id[:10]} {pg.state} {pg.bundles}")
    for actor in list_actors(limit=1000):
        if actor.state != "DEAD":
            lines.append(f"actor {actor.class_name} {actor.state} pid {actor.pid}")
    for log in sorted(folder.glob("logs/*.txt")):
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty)"]
        lines.append(f"{log.name}: {tail[0]}")
    return "\n".join(lines)


@pytest.fixture
def report_if_stalled():
    """`report_if_stalled(folder, after_s)`: if the test is still running after `after_s` seconds, print Ray's state
    and the trials' last log lines to stderr, so that a sweep that stalls says where before pytest-timeout stops it
    (a 20-trial soak hung once in CI with nothing to tell why)."""
    import sys
    import threading

    timers = []

    def arm(folder: Path, after_s: float) -> None:
        def dump() -> None:
            try:
                print(f"--- still running after {after_s:.0f} s ---\n{ray_state_report(folder)}", file=sys.stderr)
            except Exception as error:  # a report, never a second failure
                print(f"--- still running after {after_s:.0f} s; Ray's state unreadable: {error!r}", file=sys.stderr)

        timer = threading.Timer(after_s, dump)
        timer.daemon = True
        timer.start()
        timers.append(timer)

    yield arm
    for timer in timers:
        timer.cancel()
