"""The trial unit for a contributor's own train_gpt.py: each trial runs a patched copy of the file on N Ray Train
workers, one process per worker, as torchrun would start it.

Ray Train's plain DataParallelTrainer (not the TorchTrainer, which would open a process group in the worker
itself) places the workers; each sets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT: rank 0's node and a free port there) and starts the script, which makes its own
process group. Rank 0 reads the script's stdout: the speedrun's `step:N/M val_loss:X train_time:Yms` and
`step:N/M train_time:Yms` lines become Tune reports (step, total_steps, train_time_s, val_loss), so ASHA, the
record-curve pruner and the verdicts read them as they read the speedrun trainer's. Ray Train's report is
collective: rank 0 broadcasts each batch of lines, and every rank reports it.

Ends: the script's exit 0 after a last validation is a finished trial (diverged if that loss is not finite);
a non-zero exit, on any rank, or no output for `stall_s` seconds fails the trial with the last lines of its
stderr as the reason (after Ray Train's retries). A stopped trial (ASHA, Ctrl-C) kills the worker; the
script dies with it (PR_SET_PDEATHSIG) and its process group is killed on every way out of the worker.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .knobs import code_hash, diff, set_knobs
from .protocol import FINISHED, TrialStatus
from .records import Track, projected_time_s
from .script_space import ScriptConfig, split_params
from .speedrun_logs import step_line
from .storage import fetch_path, push_paths

TAIL_LINES = 20


@dataclass(frozen=True)
class ScriptSpec:
    """What every trial of a sweep of one script shares."""
    space: object  # sweeps.script_space.ScriptSpace
    source_path: str  # the contributor's file (absolute)
    code_dir: str  # each trial's patched copy, its output and its log folder: <code_dir>/<trial_id>/
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    env: dict = field(default_factory=dict)  # the sweep's trial environment and --env values
    train_storage: str = ""
    max_failures: int = 1
    done_dir: str = ""
    stall_s: float = 900.0  # no line of output for this long: the trial fails
    track: Track | None = None
    code_version: str = "unknown"
    storage: str = ""  # the sweeps' storage root (sweeps.storage): a URI's trial folders are pushed there

    def trial_files(self, trial_id: str) -> dict[str, Path]:
        """A trial's own files for MLflow: the script's log (logs/<id>.txt, as train.log), the diff, its output."""
        folder = Path(self.code_dir) / trial_id
        fetch_path(self.storage, str(folder), refresh=True)  # a URI's: the folder the workers pushed
        logs = sorted((folder / "logs").glob("*.txt"), key=lambda p: p.stat().st_mtime)
        files = {name: folder / name for name in ("diff.patch", "code.json", "stdout.rank0.txt", "stderr.rank0.txt")}
        if logs:
            files["train.log"] = logs[-1]  # the last attempt's, after a Ray Train retry
        return files

    def config_for(self, params: dict) -> ScriptConfig:
        return ScriptConfig(self.source_path, dict(params), dict(self.env))

    def trial_code(self, config: dict) -> tuple[str, dict]:
        """(the file a trial runs, its knob and env.* values) for Tune's trial config."""
        return self.source_path, {**self.space.fixed, **{p.key: config[p.key] for p in self.space.params}}


def prepare_code(source_path: str, folder: Path, params: dict) -> tuple[Path, dict]:
    """`folder` holding the patched copy of source_path, its diff.patch and code.json; returns (script path,
    environment variables of the env.* params)."""
    knobs, env = split_params(params)
    original = Path(source_path).read_text()
    patched = set_knobs(original, knobs, Path(source_path).name)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / Path(source_path).name
    script.write_text(patched)
    (folder / "diff.patch").write_text(diff(original, patched, Path(source_path).name))
    (folder / "code.json").write_text(json.dumps({"source": source_path, "source_sha256": code_hash(original),
                                                  "code_sha256": code_hash(patched), "env": env, "knobs": knobs}))
    return script, env


def run_script_trial(config: dict, spec: ScriptSpec) -> None:
    """The Tune trainable of a script sweep: one DataParallelTrainer.fit() per trial."""
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from .train_relay import TrainRelay, report_done

    trial_start = time.time()
    os.environ.update(spec.env)  # Ray Train hands its own RAY_TRAIN_* settings on to its controller
    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    done_path = os.path.join(spec.done_dir, f"{trial_id}.json") if spec.done_dir else ""
    if report_done(spec.storage, done_path):  # it ended before a driver crash: report its end again
        return
    source, params = spec.trial_code(config)
    script, env = prepare_code(source, Path(spec.code_dir) / trial_id, params)
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    TrainRelay(done_path, spec.storage).run(lambda callbacks: DataParallelTrainer(
        script_worker,
        train_loop_config={"script": str(script), "env": {**spec.env, **env}, "trial_start": trial_start,
                           "stall_s": spec.stall_s, "done_path": done_path, "track": spec.track,
                           "use_gpu": spec.use_gpu, "storage": spec.storage},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{ctx.get_experiment_name()}-{trial_id}", storage_path=spec.train_storage or None,
                             callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=spec.max_failures,
                                                          controller_failure_limit=0)),
    ))


def _die_with_parent() -> None:
    """In the script's process before exec: its own session (process group), SIGKILL when the worker dies."""
    os.setsid()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the worker's own exit paths still kill the group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def torchrun_env(ctx, master: tuple[str, int]) -> dict:
    return {"RANK": str(ctx.get_world_rank()), "LOCAL_RANK": str(ctx.get_local_rank()),
            "WORLD_SIZE": str(ctx.get_world_size()), "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
            "GROUP_RANK": str(ctx.get_node_rank()), "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]),
            "TORCHELASTIC_RUN_ID": "speedrun-sweeps"}


def visible_devices(node_visible: str, mine: list[str], local_rank: int) -> str:
    """CUDA_VISIBLE_DEVICES for a worker's script: the node's GPUs of this trial (Ray Train shares them among the
    trial's workers on a node, TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES), ordered so that device LOCAL_RANK is
    the worker's own; the others stay visible for NCCL's peer-to-peer paths."""
    others = [d for d in node_visible.split(",") if d and d not in mine]
    at = min(local_rank, len(others))
    return ",".join(others[:at] + mine + others[at:])


def _read_lines(stream, sink, out: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        out.put(line)
    out.put(None)


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


def _with_tail(failure: str, rank: int, stderr_path: Path) -> str:
    """The failure, the last lines of the rank's stderr, and the failure again: Ray Train keeps only the start
    and the end of a long worker error (its traceback fills the start), and results show an error's last line."""
    return f"{failure}; last stderr lines of rank {rank}:\n{_tail(stderr_path)}\n{failure}"


class ScriptFailed(RuntimeError):
    """The script exited non-zero or stalled; the message carries the last lines of its stderr."""


def script_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: start the script as torchrun would, relay rank 0's step lines as reports."""
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    master = broadcast_from_rank_zero((ray.util.get_node_ip_address(), _free_port()) if rank == 0 else None)
    script = Path(loop_config["script"])
    folder = script.parent
    env = {**os.environ, **loop_config["env"], **torchrun_env(ctx, master), "PYTHONUNBUFFERED": "1"}
    if loop_config["use_gpu"]:  # the script takes cuda:LOCAL_RANK: make that this worker's own GPU
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                                                      [str(g) for g in ray.get_gpu_ids()], ctx.get_local_rank())
    stdout_path, stderr_path = folder / f"stdout.rank{rank}.txt", folder / f"stderr.rank{rank}.txt"
    stdout_sink, stderr_sink = open(stdout_path, "w"), open(stderr_path, "w")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=stderr_sink, text=True, bufsize=1, preexec_fn=_die_with_parent)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, stdout_sink, lines), daemon=True).start()
    last_val: dict = {}
    first = True
    from .system_metrics import SystemSampler
    from .trial import gpu_ids, worker_node
    node = broadcast_from_rank_zero(worker_node() if rank == 0 else None)  # the trial's node: its rank 0's
    sampler = SystemSampler(gpu_ids()) if rank == 0 else None
    try:
        while True:
            batch = None
            if rank == 0:
                batch = _next_batch(lines, loop_config["stall_s"])
                if batch["end"] == "eof":  # the script closed its stdout: its exit code, for every rank
                    batch["exit"] = _wait(proc, 60)
            batch = broadcast_from_rank_zero(batch)
            for metrics in batch["reports"]:
                if first:  # the clock of the trial's start-up stops at the script's first step line
                    metrics["trial_startup_s"] = time.time() - loop_config["trial_start"]
                    metrics.update(node)
                    first = False
                if "val_loss" in metrics:
                    last_val = metrics
                ray.train.report({**metrics, **(sampler.take() if sampler else {})})
            if batch["end"]:
                break
        exit_note = check_end(batch, rank, proc, script.name, stderr_path, loop_config["stall_s"],
                              complete=bool(last_val) and last_val["step"] >= last_val["total_steps"])
    finally:
        if sampler is not None:
            sampler.stop()
        _kill_group(proc)
        stdout_sink.close()
        stderr_sink.close()
        push_paths(loop_config.get("storage", ""), str(folder))  # this rank's output, the script's log and diff
    report_end(rank, loop_config, {**final_metrics(last_val, loop_config.get("track")), **node}, exit_note)


def report_end(rank: int, loop_config: dict, final: dict, exit_note: "ExitAfterEnd | None") -> None:
    """The trial's final report, from every rank; rank 0 first leaves it as the trial's done marker."""
    import ray.train

    from .trial import send_end

    if exit_note:  # it crashed after its final validation: the result stands, the exit is on record
        print(f"warning: {exit_note.message}", file=sys.stderr, flush=True)
        final["script_exit_code"] = exit_note.code
    send_end(loop_config, rank, final, ray.train.report)


@dataclass(frozen=True)
class ExitAfterEnd:
    """A script's non-zero exit after its final validation line (a crash in its teardown, such as a process group
    aborting at exit): the run's result is complete, so the trial keeps it; the exit is reported beside it."""
    message: str
    code: int


def check_end(batch: dict, rank: int, proc: subprocess.Popen, name: str, stderr_path: Path, stall_s: float,
              complete: bool = False) -> ExitAfterEnd | None:
    """ScriptFailed unless the scripts of every rank ended with 0: a stall, a non-zero exit of this rank's script,
    or of rank 0's (told in the batch), with the last lines of this rank's stderr. A run that had printed its
    final validation (`complete`) and then exited non-zero is not failed: the exit comes back as ExitAfterEnd."""
    if batch["end"] == "stall":
        raise ScriptFailed(_with_tail(f"no output from {name} for {stall_s:.0f}s (stalled)", rank, stderr_path))
    code = batch["exit"] if rank == 0 else (_wait(proc, 120) if batch["exit"] == 0 else proc.poll())
    failure = None
    if code != 0 and code is not None:
        failure, exit_code = f"{name} exited with {code} on rank {rank}", code
    elif batch["exit"] != 0:
        failure = (f"{name} on rank 0 exited with {batch['exit']} (rank {rank}'s own script "
                   f"{'is still running' if code is None else 'ended'})")
        exit_code = batch["exit"]
    elif code is None:
        raise ScriptFailed(f"{name} on rank {rank} did not exit within 120 s of rank 0's end")
    if failure is None:
        return None
    if not complete:
        raise ScriptFailed(_with_tail(failure, rank, stderr_path))
    return ExitAfterEnd(f"{failure} after its final validation line; its result is kept", int(exit_code))


def _next_batch(lines: queue.Queue, stall_s: float) -> dict:
    """Rank 0: the step lines that arrived since the last batch (every validation, the latest training line),
    waiting for at least one; `end` is "eof" when the script closed its stdout, "stall" after stall_s of silence."""
    reports, latest_train, end = [], None, None
    deadline = time.time() + stall_s
    while not reports and latest_train is None and end is None:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            end = "stall"
            break
        while True:
            if line is None:
                end = "eof"
                break
            parsed = step_line(line)
            if parsed and "val_loss" in parsed:
                if latest_train is not None and latest_train["step"] < parsed["step"]:
                    reports.append(latest_train)
                latest_train = None
                reports.append(parsed)
            elif parsed:
                latest_train = parsed
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
    if latest_train is not None:
        reports.append(latest_train)
    return {"reports": reports, "end": end}


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout) if timeout else proc.poll()
    except subprocess.TimeoutExpired:
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def final_metrics(last_val: dict, track: Track | None) -> dict:
    """The trial's last report, from the script's last validation line (the end of its schedule)."""
    if not last_val:
        raise ScriptFailed("the script printed no validation line (step:N/M val_loss:X train_time:Yms)")
    loss, step, total = last_val["val_loss"], last_val["step"], last_val["total_steps"]
    if step < total:
        raise ScriptFailed(f"the script's last validation was at step {step} of {total}: it did not run to the end")
    status = TrialStatus.FINISHED if math.isfinite(loss) else TrialStatus.DIVERGED
    out = {"step": step, "total_steps": total, "val_loss": loss, "final_val_loss": loss, "status": status.value,
           "train_time_s": last_val["train_time_s"], "reached_target": False, FINISHED: True,
           "time_to_target_s": float("nan")}
    if track is not None:
        reached = status == TrialStatus.FINISHED and loss <= track.target_loss
        out["reached_target"] = reached
        out["time_to_target_s"] = last_val["train_time_s"] if reached else float("nan")
        if track.exchange_rate:
            out["objective_time_s"] = projected_time_s(loss, last_val["train_time_s"], step, track)
    return out
