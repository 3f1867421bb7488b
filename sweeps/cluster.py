"""Where trials run: this machine's or the Ray cluster's resources, the worker layout of a trial, how many
trials fit at once, the environment of every trial process, and starting (or joining) Ray around a Tuner.
Also the one way the CLIs refuse bad input (BadInput -> one `error:` line, exit code 2)."""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass

EXIT_BAD_INPUT = 2


@dataclass
class Resources:
    """What trials can use: this machine's CPUs and GPUs, or a Ray cluster's over all its nodes."""
    cpus: float
    gpus: int
    limits: dict | None = None  # an autoscaling cluster's maximum ({"CPU": n, "GPU": m}); None: it is fixed
    where: str = "this machine"
    node_gpus: int | None = None  # the most GPUs one node has (or an autoscaler's node type); None: `gpus`

    @property
    def gpus_per_node(self) -> int:
        return self.gpus if self.node_gpus is None else self.node_gpus

    def most(self) -> dict:
        """What it holds at most: now, or once its autoscaler has added every node it may."""
        return self.limits or {"CPU": self.cpus, "GPU": self.gpus}


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def local_resources() -> Resources:
    import torch
    return Resources(cpus=float(os.cpu_count() or 1), gpus=torch.cuda.device_count())


def resources_for(address: str | None) -> Resources:
    """The resources a sweep plans with: the cluster's at --address (not the driver's machine), else this machine's."""
    return cluster_resources(address) if address else local_resources()


def cluster_resources(address: str) -> Resources:
    """All nodes' CPUs and GPUs of the Ray cluster at `address`, and its autoscaler's maximum if it has one."""
    import ray

    own = not ray.is_initialized()
    try:
        if own:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        total, limits = ray.cluster_resources(), autoscaler_limits()
        node_gpus = max([int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]] + [node_type_gpus()])
    except (ConnectionError, ValueError) as e:
        raise BadInput(f"--address {address}: no Ray cluster answers there ({str(e).splitlines()[0][:120]}): start "
                       "one (ray start --head) or fix --address / RAY_ADDRESS") from None
    finally:
        if own and ray.is_initialized():
            ray.shutdown()
    return Resources(cpus=float(total.get("CPU", 0)), gpus=int(total.get("GPU", 0)), limits=limits,
                     where=f"the Ray cluster at {address}", node_gpus=node_gpus)


def node_type_gpus() -> int:
    """The most GPUs of one node type an autoscaler may add (0 without an autoscaler)."""
    try:
        from ray._private.state import state
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config
        return 0
    return max([int(g.resources.get("GPU", 0)) for g in config.node_group_configs] + [0]) if config else 0


def autoscaler_limits() -> dict | None:
    """The connected cluster's maximum resources over its autoscaler's node types; None for a fixed cluster."""
    try:
        from ray._private.state import state  # what Ray Data's autoscaling reads too; no public API yet
        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS, no autoscaler: a fixed cluster
        return None
    return {k: float(v) for k, v in limits.items()} if limits else None


def ray_env() -> None:
    """Driver-side settings, before Ray starts."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # reports block ~2 s otherwise
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # train-loss reports carry no val_loss
    # Save the experiment state (trials + searcher) at most a second apart (default: every 10 s or more), so
    # a driver killed outright loses at most the last second: a trial finished before that is not re-run.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Tune's own console output (its experiment box, the TensorBoard hint, status tables) is replaced by
    # results.ProgressPrinter and the sweep's summary; with the legacy reporter at verbose=0 it prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


class _NoTuneResumeHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)": the sweep prints its own resume command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


def execute(make_tuner_fn, address: str | None, env: dict, need: tuple | None = None, stops: bool = False,
            hosts: int = 0, host_prefix: str = "speedrun-host"):
    """Start (or join) Ray, run the Tuner, shut down what we started; return Tune's ResultGrid.
    `need` = (workers, use_gpu, gpus_per_worker, cpus_per_worker) of one trial: refused (BadInput) before
    any trial starts when the cluster, all nodes together, cannot hold it. `stops`: a scheduler may stop trials,
    which needs what frees a stopped trial's resources (check_stopped_trials_are_freed). `hosts` > 0
    (--reuse-workers): that many warm trial hosts of one worker's resources (named `host_prefix`-i) live while
    the Tuner runs, and `make_tuner_fn(hosts)` gets their handles."""
    import ray

    own_ray = not ray.is_initialized()  # a caller (a test, a notebook) may have started Ray already
    runtime_env = {"env_vars": env}
    if address:  # a remote cluster gets this checkout's code, not whatever its nodes have installed
        import speedrun
        import sweeps
        # as folders, not module objects: inside a Ray job, ray.init merges (deep-copies) this with the job's env
        runtime_env["py_modules"] = [os.path.dirname(m.__file__) for m in (speedrun, sweeps)]
    if own_ray:
        extra = {} if address else local_ray_options()
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                 logging_level="WARNING", configure_logging=True, **extra)
    logging.getLogger("ray.tune.tune").addFilter(_NoTuneResumeHint())
    try:
        if need:
            limits = autoscaler_limits()
            if limits is None:
                check_capacity(ray.cluster_resources(), "the Ray cluster", *need)
            else:
                wait_for_capacity(limits, need, float(env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                                              RESOURCE_TIMEOUT_S)))
        if stops:
            check_stopped_trials_are_freed()
        if not hosts:
            return make_tuner_fn().fit()
        from sweeps.trial_hosts import start_hosts, stop_hosts
        workers, use_gpu, gpus_per_worker, cpus_per_worker = need
        try:
            handles = start_hosts(hosts, {"CPU": cpus_per_worker, "GPU": gpus_per_worker if use_gpu else 0},
                                  float(env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", RESOURCE_TIMEOUT_S)),
                                  host_prefix)
        except TimeoutError as e:
            raise BadInput(str(e)) from None
        try:
            return make_tuner_fn(handles).fit()
        finally:
            stop_hosts(handles)
    finally:
        if own_ray:
            ray.shutdown()


def wait_for_capacity(limits: dict, need: tuple, timeout_s: float, poll_s: float = 2.0) -> None:
    """On an autoscaling cluster: refuse a trial that even its largest size cannot hold; otherwise ask the
    autoscaler for one trial's worth (ray.autoscaler.sdk.request_resources) and wait, saying so, until the cluster
    holds it; BadInput after timeout_s (--resource-timeout)."""
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    from sweeps.protocol import TRIAL_CPU

    check_capacity(limits, "the Ray cluster at its autoscaler's maximum", *need)
    workers, use_gpu, gpus_per_worker, cpus_per_worker = need

    def short() -> str | None:
        lacking = capacity_shortfall(ray.cluster_resources(), "the Ray cluster now", *need)
        return lacking[0] if lacking else None

    missing = short()
    if missing is None:
        return
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    request_resources(bundles=[bundle] * workers + [{"CPU": TRIAL_CPU}])
    t0, said = time.time(), -math.inf
    while missing is not None:
        waited = time.time() - t0
        if waited > timeout_s:
            raise BadInput(f"the autoscaling cluster did not scale up within {timeout_s:.0f}s ({missing}): check its "
                           "autoscaler's log, or raise --resource-timeout")
        if waited - said >= 10:
            print(f"waiting for the cluster to scale up ({waited:.0f}s): {missing}", file=sys.stderr, flush=True)
            said = waited
        time.sleep(poll_s)
        missing = short()
    print(f"the cluster holds a trial after {time.time() - t0:.0f}s of scaling up", file=sys.stderr, flush=True)


def check_stopped_trials_are_freed(timeout_s: float = 10.0, wait_s: float = 30.0) -> None:
    """BadInput unless Ray's State API (served by its dashboard) answers. When a scheduler stops a trial, Tune kills
    the trial's actor, and the placement group of its Ray Train workers is freed only by Ray's cleaner, which asks
    the State API; without it the reservation leaks and the next trial waits for resources for ever (seen on a
    one-GPU machine: docs/ARCHITECTURE.md). Asks the cluster this process is connected to: with another Ray on
    the machine (a second sweep, a `ray start`), the State API's own discovery cannot tell which to ask."""
    import time

    import ray
    from ray.util.state import list_nodes

    address = ray.get_runtime_context().gcs_address
    deadline = time.time() + wait_s  # a dashboard that is still starting gets that long to answer
    while True:
        try:
            list_nodes(address=address, limit=1, timeout=timeout_s, raise_on_missing_output=False)
            return
        except Exception as e:  # noqa: BLE001 - whatever the cause, the cleaner cannot work
            if time.time() < deadline:
                time.sleep(2.0)
                continue
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise BadInput(f"Ray's dashboard (its State API) does not answer ({reason}): it frees the resources of a "
                       "trial the scheduler stops, and without it the next trial would wait for ever; start Ray "
                       "with its dashboard (pip install 'ray[default]', a free port 8265), or sweep with "
                       "--scheduler none") from None


def local_ray_options() -> dict:
    """`ray.init` arguments (and environment) for a Ray this process starts on its own machine, as the CLI, the
    benchmarks and the tests start it. Ray Train's preemption watcher (one more actor per trial, polling for
    node drains a cloud autoscaler announces) is off: a single local node is never drained. A set
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER wins."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return {"num_cpus": local_ray_cpus()}


def local_ray_cpus() -> int:
    """The logical CPUs a local Ray is started with: twice this machine's. Ray 2.60 can leave a stopped trial's
    worker reservation held in the raylet after the GCS has removed its placement group (seen after a prune on
    2 cores: the next trial then waited for ever); the headroom absorbs such a leak. It cannot oversubscribe:
    the searcher's concurrency limit (concurrency_for, from the real CPUs) caps live trials."""
    return 2 * (os.cpu_count() or 1)


def capacity_shortfall(have: dict, where: str, workers: int, use_gpu: bool, gpus_per_worker: float,
                       cpus_per_worker: float) -> tuple[str, str] | None:
    """(what one trial lacks in `have` ({"CPU": n, "GPU": m}: this machine, or the whole Ray cluster), the fix);
    None when it holds one trial."""
    from sweeps.protocol import TRIAL_CPU

    have_gpu, have_cpu = have.get("GPU", 0), have.get("CPU", 0)
    if use_gpu and workers * gpus_per_worker > have_gpu:
        return (f"a trial needs {workers * gpus_per_worker:g} GPUs (--workers-per-trial {workers} x "
                f"--gpus-per-worker {gpus_per_worker:g}); {where} has {have_gpu:g}", "lower them or add GPUs")
    if workers * cpus_per_worker + TRIAL_CPU > have_cpu:
        return (f"a trial needs {workers * cpus_per_worker + TRIAL_CPU:g} CPUs (--workers-per-trial {workers} x "
                f"--cpus-per-worker {cpus_per_worker:g}, +{TRIAL_CPU} for the trial itself); {where} has "
                f"{have_cpu:g}", "lower one of them")
    return None


def check_capacity(have: dict, where: str, workers: int, use_gpu: bool, gpus_per_worker: float,
                   cpus_per_worker: float) -> None:
    """BadInput unless `have` holds one trial (capacity_shortfall)."""
    short = capacity_shortfall(have, where, workers, use_gpu, gpus_per_worker, cpus_per_worker)
    if short is not None:
        raise BadInput(f"{short[0]}: {short[1]}")


def worker_layout(args, device: str, res: Resources, gpu_by_default: bool = True) -> tuple[bool, float, int]:
    """(use_gpu, gpus_per_worker, workers per trial) from the flags, the trial config's `run.device` and the
    machine; BadInput if a trial cannot fit on this machine (on a remote cluster, execute() checks once
    connected). Workers without a GPU reservation must train on the CPU (the caller sets run.device=cpu):
    Ray does not hide the GPUs from them, and trials would share a GPU that none of them reserved."""
    if args.gpus_per_worker is not None:
        use_gpu = args.gpus_per_worker > 0
    else:
        use_gpu = res.most().get("GPU", 0) > 0 and (device == "cuda" or (device == "auto" and gpu_by_default))
    if device == "cuda" and not use_gpu:
        raise BadInput("run.device=cuda needs GPU workers: drop --gpus-per-worker 0, or run on a machine with GPUs")
    gpus_per_worker = (1.0 if use_gpu else 0.0) if args.gpus_per_worker is None else args.gpus_per_worker
    # one trial = one node's GPUs by default (all of this machine's; on a cluster, its largest node's)
    workers = args.workers_per_trial or (max(1, int(res.gpus_per_node // gpus_per_worker)) if use_gpu else 1)
    check_capacity(res.most(), res.where + (" at its autoscaler's maximum" if res.limits else ""), workers, use_gpu,
                   gpus_per_worker, args.cpus_per_worker)
    return use_gpu, gpus_per_worker, workers


def concurrency_for(args, use_gpu: bool, gpus_per_worker: float, workers: int, res: Resources, trials: int) -> int:
    """--concurrency, else as many trials as the machine's or the cluster's CPUs or GPUs hold (an autoscaling
    cluster's: once it has scaled up)."""
    from sweeps.protocol import TRIAL_CPU

    if args.concurrency:
        return args.concurrency
    most = res.most()
    if use_gpu:
        fit = int(most.get("GPU", 0) // (workers * gpus_per_worker))
    else:
        fit = int(most.get("CPU", 0) // (workers * args.cpus_per_worker + TRIAL_CPU))
    return max(1, min(fit, trials))


RESOURCE_TIMEOUT_S = 1800.0


def trial_env(folder, cpus_per_worker: float, resource_timeout_s: float = RESOURCE_TIMEOUT_S, storage=None) -> dict:
    """Environment of every trial and worker process of a sweep or record attempt in `folder`. A trial whose workers
    cannot get their resources within `resource_timeout_s` fails with Ray Train's startup timeout as its reason
    (the trials' FailureConfig tolerates no controller failure) rather than waiting for ever."""
    from sweeps.compile_cache import cache_env
    from sweeps.storage import forwarded_env
    from sweeps.trial import worker_env

    # Inductor's and Triton's caches are node-local even when the sweep is stored under a URI (storage.py)
    return worker_env({**(forwarded_env(storage) if storage is not None else {}),
                       "OMP_NUM_THREADS": str(max(1, int(cpus_per_worker))), **cache_env(str(folder / "inductor_cache")),
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(resource_timeout_s)})


class BadInput(ValueError):
    """Input that must be refused before any compute is spent: exit 2 with this one-line message."""


