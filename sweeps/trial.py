"""The trial unit: a Ray Tune function trainable whose body is a Ray Train V2 run of `speedrun.train`.

The Tune trial reserves almost nothing (0.01 CPU); the TorchTrainer's workers reserve the real CPUs or
GPUs. Ray sets RANK/WORLD_SIZE/LOCAL_RANK and the process group, so `speedrun.train` runs as under
torchrun. Every rank reports (Ray Train V2's report is collective); `train_relay.TrainRelay` forwards rank
0's metrics to Tune. The last report of a trial that ran to the end carries `finished_training`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace

from speedrun.config import TrainConfig

from .protocol import TrialStatus, FINISHED, index_from_dirname
from .records import Track, projected_time_s
from .system_metrics import SystemSampler
from .spaces import Space
from .storage import push_paths



@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one sweep shares."""
    space: Space
    overrides: dict = field(default_factory=dict)  # data folder, threads: set by the driver
    steps: int = 0
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    train_storage: str = ""  # absolute path or URI where Ray Train keeps each trial's run
    max_failures: int = 1
    env: dict = field(default_factory=dict)  # set in every trial and worker process before training
    log_dir: str = ""  # where rank 0 writes each trial's speedrun-format log (absolute path), if set
    code_version: str = "unknown"
    faults: "FaultPlan | None" = None  # test-only: workers to SIGKILL mid-trial
    done_dir: str = ""  # where each trial leaves its final metrics when it ends (absolute path), if set
    track: Track | None = None  # for the time objective's projection of a missed target
    compile_cache: str = ""  # folder or URI of the sweep's portable compile-cache artifacts, if set
    storage: str = ""  # the sweeps' storage root (sweeps.storage): a URI's trial files are pushed there
    hosts: tuple = ()  # --reuse-workers: the sweep's warm trial hosts (Ray actor handles), one per trial slot

    def trial_files(self, trial_id: str) -> dict:
        """A trial's own files for MLflow: rank 0's speedrun log (the last attempt's) as train.log."""
        from pathlib import Path

        from .storage import fetch_path
        if self.log_dir:
            fetch_path(self.storage, self.log_dir, refresh=True)  # a URI's: the logs the workers pushed
        logs = sorted(Path(self.log_dir).glob(f"{trial_id}_seed*.txt"), key=lambda p: p.stat().st_mtime) \
            if self.log_dir else []
        return {"train.log": logs[-1]} if logs else {}

    def config_for(self, params: dict) -> TrainConfig:
        cfg = self.space.trial_config(params, self.steps)
        return cfg.override(self.overrides)


def final_metrics(result, cfg: TrainConfig, track: Track | None = None) -> dict:
    """The last report of a trial. A diverged run reports its step-0 loss, so the searcher learns it was bad.
    `time_to_target_s` is the end-of-run time of a run that ended at or below the target. With a track,
    `objective_time_s` is the time objective: that time projected through the track's exchange rate."""
    first = result.history[0]["val_loss"] if result.history else math.log(cfg.model.vocab_size)
    val = result.val_loss if result.status == TrialStatus.FINISHED else first
    out = {
        "step": result.steps, "val_loss": val, "final_val_loss": result.val_loss, "status": result.status,
        "train_time_s": result.train_time_s, "tokens": result.tokens, "peak_mem_bytes": result.peak_mem_bytes,
        "compile_s": result.compile_s, "startup_s": result.startup_s, "val_time_s": result.val_time_s,
        "time_to_target_s": result.time_to_target_s if result.time_to_target_s is not None else float("nan"),
        "reached_target": result.time_to_target_s is not None, FINISHED: True,
    }
    if result.floor is not None:
        out["floor"] = result.floor
    if track is not None and track.exchange_rate:  # an estimate (records.projected_time_s), never a verdict
        out["objective_time_s"] = projected_time_s(val, result.train_time_s, result.steps,
                                                   replace(track, target_loss=cfg.run.target_loss))
    return out


def environment_header(code_version: str) -> list[str]:
    """The top of a speedrun log: code version, Python, torch, GPUs and driver."""
    import platform
    import subprocess

    import torch

    lines = [f"code version: {code_version}", f"python {platform.python_version()}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            driver = "unknown"
        lines.append(f"GPUs: {len(names)}x {names[0]}, driver {driver}, CUDA {torch.version.cuda}")
    else:
        lines.append(f"CPU only: {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    return ["# " + line for line in lines]


def open_log(loop_config: dict, cfg: TrainConfig):
    """Rank 0's speedrun log, headed by the environment and the config; None when the sweep keeps no logs."""
    if not loop_config.get("log_path"):
        return None
    os.makedirs(os.path.dirname(loop_config["log_path"]), exist_ok=True)
    log_file = open(loop_config["log_path"], "w")
    log_file.write("\n".join(environment_header(loop_config.get("code_version", "unknown"))) + "\n")
    log_file.write(f"# config: {json.dumps(cfg.to_dict(), sort_keys=True)}\n")
    return log_file


def worker_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    train_one(loop_config, ray.train.get_context().get_world_rank(), ray.train.report)


def train_one(loop_config: dict, rank: int, send, extra: dict | None = None) -> None:
    """One trial's run of `speedrun.train` in this process: `send(metrics)` takes every report, the final
    one (`final_metrics`) last; `extra` joins the first report (what a warm host says of itself)."""
    from speedrun.train import train

    os.environ.update(loop_config["env"])
    cfg = TrainConfig.from_dict(loop_config["config"])
    trial_start = loop_config["trial_start"]
    worker_start_s = time.time() - trial_start  # Ray Train's controller, placement and worker process start
    log_file = open_log(loop_config, cfg) if rank == 0 else None
    node = worker_node()

    sampler = SystemSampler(gpu_ids()) if rank == 0 else None

    def report(metrics: dict) -> None:
        metrics = {**metrics, "total_steps": cfg.schedule.total_steps}  # schedulers compare schedule fractions
        if sampler is not None:
            metrics.update(sampler.take())
        if "startup_s" in metrics:  # the first report, after warm-up (compilation); the clock starts now
            metrics["trial_startup_s"] = time.time() - trial_start
            metrics["worker_start_s"] = worker_start_s
            metrics.update(node)
            metrics.update(warm.after_warmup())
            metrics.update(extra or {})
            log(startup_line(metrics))
        send(metrics)

    def log(line: str) -> None:
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    fault = loop_config.get("fault")  # test-only: {"step": k, "marker": path, "every": bool}
    warm = WarmStart.begin(cfg, loop_config.get("compile_cache", ""), rank)

    def report_or_die(metrics: dict) -> None:
        if fault and not fault.get("lost") and rank == 0 and metrics.get("step", 0) >= fault["step"] \
                and "train_loss" in metrics:
            if fault["every"] or not os.path.exists(fault["marker"]):
                open(fault["marker"], "a").close()
                if fault.get("stall"):  # hangs as a dead collective peer would leave it
                    threading.Event().wait()
                os.kill(os.getpid(), signal.SIGKILL)
        report(metrics)

    try:
        result = train(cfg, report=report_or_die, log=log, report_all_ranks=True)
        log(f"peak memory allocated: {result.peak_mem_bytes // 2**20} MiB")
    except Exception as error:
        raise portable_error(error) from None
    finally:
        if log_file:
            log_file.close()
            push_paths(loop_config.get("storage", ""), loop_config["log_path"])
        if sampler is not None:
            sampler.stop()
    send_end(loop_config, rank, {**final_metrics(result, cfg, loop_config.get("track")), **node}, send)


def send_end(loop_config: dict, rank: int, final: dict, send) -> None:
    """The trial's final report; rank 0 first leaves it as the trial's done file, durable before Tune hears."""
    fault = loop_config.get("fault")
    if rank == 0 and loop_config.get("done_path"):
        write_json_atomic(loop_config["done_path"], final)
        push_paths(loop_config.get("storage", ""), loop_config["done_path"])
        if fault and fault.get("lost"):  # test-only: the final report never leaves, as Ray once lost one
            open(fault["marker"], "a").close()
            threading.Event().wait()
    send(final)


def startup_line(m: dict) -> str:
    """Where a trial's start-up went, for its log."""
    return (f"start-up {m['trial_startup_s']:.1f}s: worker start {m['worker_start_s']:.1f}s, artifacts "
            f"load {m['compile_artifacts_load_s']:.1f}s, trainer init {m['init_s']:.1f}s, "
            f"warm-up (compile) {m['compile_s']:.1f}s, {m['compile_graphs']} graphs, "
            f"FX cache {m['compile_fx_cache_hits']}/{m['compile_fx_cache_misses']} hits/misses, "
            f"AOTAutograd {m['compile_aot_cache_hits']}/{m['compile_aot_cache_misses']}/"
            f"{m['compile_aot_cache_bypasses']} hits/misses/bypasses")


def worker_node() -> dict:
    """The Ray node this worker (rank 0: the trial's) runs on, for results and MLflow."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def gpu_ids() -> list[int]:
    """The physical GPUs Ray gave this worker (NVML's indices), for its system metrics."""
    import ray

    return [int(g) for g in ray.get_gpu_ids() if str(g).isdigit()]


def portable_error(error: Exception) -> Exception:
    """The error itself if it pickles, else a RuntimeError carrying its type, message and traceback. Ray Train
    pickles a worker's exception to the controller; one that holds an unpicklable object (torch's compiler
    errors can hold pybind11 functions) would otherwise reach the trial's error.txt as "... is not pickleable",
    hiding the cause."""
    import pickle
    import traceback

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return RuntimeError(f"{type(error).__name__}: {error}\n{trace[-20000:]}")


@dataclass
class WarmStart:
    """A worker's use of the sweep's compile caches: load the portable artifacts of its graph signature before
    compiling, unless this node's Inductor cache already holds them (a marker file in it says so: loading
    would rewrite the same entries); after warm-up, rank 0 saves them if none were there, and the trial
    reports what it compiled."""
    store: "ArtifactStore | None"
    key: str
    rank: int
    loaded: bool = False
    load_s: float = 0.0
    # the process's compile counters at the trial's start: a warm host's also count the trials before it
    before: dict = field(default_factory=dict)

    @staticmethod
    def node_marker(key: str) -> str:
        """A file in this node's Inductor cache folder that says the folder holds the artifacts of `key`."""
        folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
        return os.path.join(folder, "speedrun_artifacts", key) if folder else ""

    @classmethod
    def begin(cls, cfg: TrainConfig, root: str, rank: int) -> "WarmStart":
        import torch

        from .compile_cache import ArtifactStore, compile_counters, signature_key

        before = compile_counters()
        compiles = cfg.run.compile and cfg.run.device != "cpu" and torch.cuda.is_available()
        if not (root and compiles):
            return cls(None, "", rank, before=before)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        warm = cls(ArtifactStore(root), signature_key(cfg, world, torch.cuda.get_device_name()), rank, before=before)
        warm.load_unless_node_has_them()
        return warm

    def load_unless_node_has_them(self) -> None:
        marker = self.node_marker(self.key)
        if marker and os.path.exists(marker):
            return
        t0 = time.perf_counter()
        self.loaded = self.store.load(self.key)
        self.load_s = time.perf_counter() - t0
        if self.loaded:
            self.mark_node()

    def mark_node(self) -> None:
        marker = self.node_marker(self.key)
        if marker:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "a").close()

    def after_warmup(self) -> dict:
        from .compile_cache import compile_counters

        out = {f"compile_{k}": v - self.before.get(k, 0) for k, v in compile_counters().items()}
        out["compile_artifacts_loaded"] = int(self.loaded)
        out["compile_artifacts_load_s"] = self.load_s
        if self.store is not None and self.rank == 0:
            out["compile_artifacts_saved_bytes"] = self.store.save(self.key)
            if out["compile_artifacts_saved_bytes"]:
                self.mark_node()
        return out


def write_json_atomic(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def trial_loop_config(config: dict, spec: TrialSpec) -> dict | None:
    """What a trial's worker(s) run (`train_one`'s loop_config), from Tune's config; None for a trial that had
    ended before a driver crash (its end is reported again here, nothing is re-trained)."""
    import ray.tune

    from .train_relay import report_done

    trial_start = time.time()
    os.environ.update(spec.env)
    ctx = ray.tune.get_context()
    done_path = os.path.join(spec.done_dir, f"{ctx.get_trial_id()}.json") if spec.done_dir else ""
    if report_done(spec.storage, done_path):  # it ended, but the driver died before Tune saved that
        return None
    params = {p.key: config[p.key] for p in spec.space.params}
    cfg = spec.config_for(params)
    log_path = (os.path.join(spec.log_dir, f"{ctx.get_trial_id()}_seed{cfg.run.seed}.txt") if spec.log_dir else "")
    index = index_from_dirname(ctx.get_trial_dir())
    fault = None
    if spec.faults and spec.faults.hits(index):
        fault = {"step": spec.faults.step, "every": spec.faults.every(index), "stall": spec.faults.stalls(index),
                 "lost": spec.faults.loses(index),
                 "marker": os.path.join(spec.log_dir or ctx.get_trial_dir(), f".fault-{ctx.get_trial_id()}")}
    return {"config": cfg.to_dict(), "trial_start": trial_start, "env": spec.env, "log_path": log_path,
            "code_version": spec.code_version, "fault": fault, "done_path": done_path, "track": spec.track,
            "compile_cache": spec.compile_cache, "storage": spec.storage, "trial_id": ctx.get_trial_id(),
            "trial_index": index}


def run_trial(config: dict, spec: TrialSpec) -> None:
    """The Tune trainable: one TorchTrainer.fit() per trial."""
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_relay import TrainRelay

    loop_config = trial_loop_config(config, spec)
    if loop_config is None:
        return
    ctx = ray.tune.get_context()
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    # a test's fault plan waits less for a lost final report
    TrainRelay(loop_config["done_path"], spec.storage, grace_s=10.0 if spec.faults else 60.0).run(lambda callbacks: TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{ctx.get_experiment_name()}-{ctx.get_trial_id()}",
            storage_path=spec.train_storage or None,
            callbacks=callbacks,
            # a worker group that cannot start within the resource timeout (cluster.trial_env) fails the trial
            failure_config=FailureConfig(max_failures=spec.max_failures, controller_failure_limit=0),
        ),
    ))


@dataclass(frozen=True)
class FaultPlan:
    """Test-only fault injection: rank 0 of the chosen trials SIGKILLs itself at its first training report at
    or after `step`. `"2,5:every"` kills trial 2 on its first attempt only (Ray Train's retry recovers it)
    and trial 5 on every attempt (it fails); `"4:stall"` makes trial 4 hang there instead (for ever, its
    process alive); `"3:lost"` lets trial 3 train to its end and write its done file, then hangs rank 0 instead
    of sending the final report (as Ray once lost one: sweeps.train_relay); `"rate=0.1,seed=3"` picks each trial with probability 0.1 (seeded, by trial index) and
    kills it on every attempt."""
    trials: dict = field(default_factory=dict)  # index -> "first" | "every" | "stall" | "lost"
    rate: float = 0.0
    seed: int = 0
    step: int = 2

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        trials, kw = {}, {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            if "=" in item:
                key, value = item.split("=", 1)
                if key not in ("rate", "seed", "step"):
                    raise ValueError(f"--inject-faults: unknown key {key!r} (rate, seed, step)")
                kw[key] = float(value) if key == "rate" else int(value)
            else:
                index, _, when = item.partition(":")
                if when not in ("", "first", "every", "stall", "lost") or not index.isdigit():
                    raise ValueError(f"--inject-faults: {item!r} is not TRIAL[:first|every|stall|lost]")
                trials[int(index)] = when or "first"
        return cls(trials=trials, **kw)

    def hits(self, index: int) -> bool:
        if index in self.trials:
            return True
        return self.rate > 0 and random.Random(f"{self.seed}:{index}").random() < self.rate

    def every(self, index: int) -> bool:
        return self.trials.get(index, "every") in ("every", "stall")

    def stalls(self, index: int) -> bool:
        return self.trials.get(index) == "stall"

    def loses(self, index: int) -> bool:
        return self.trials.get(index) == "lost"


def worker_env(extra: dict | None = None) -> dict:
    """Environment every Ray process of the sweep gets (through runtime_env)."""
    env = {k: os.environ[k] for k in ("SPEEDRUN_CACHE", "SPEEDRUN_DATA") if k in os.environ}
    env.update(extra or {})
    return env
