"""MLflow: one experiment per space, a parent run per sweep, a nested child run per trial, its verdict.

Every MLflow write of the project goes through MlflowTracker (sweeps, --confirm-top re-runs, record attempts),
and only the driver makes one; workers never import MLflow. Runs are addressed by
id through an MlflowClient, so nothing depends on MLflow's global "active run".
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import math
import os
import platform
import signal
import subprocess
import tempfile
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from .sweep_data import Fingerprints, measured
from .system_metrics import PREFIX as SYSTEM_PREFIX
from .records import CANDIDATE, INTERRUPTED, Judge, Track
from .protocol import ENDED, FINISHED, TrialStatus, trial_index
from .results import error_file_line

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's run status per trial status, so that the run list shows at a glance which trials ran their schedule
RUN_STATUS = {TrialStatus.FINISHED: "FINISHED", TrialStatus.PRUNED: "KILLED", TrialStatus.DIVERGED: "FAILED",
              TrialStatus.FAILED: "FAILED"}
# test-only: SIGKILL the driver right after trial N is recorded, before Tune saves the experiment state
KILL_DRIVER_ENV = "SPEEDRUN_SWEEPS_TEST_KILL_DRIVER_AFTER_TRIAL"
REPORT_KEYS = ("train_loss", "val_loss", "train_time_s", "tokens", "compile_s", "startup_s", "trial_startup_s",
               "val_time_s", "compile_graphs", "compile_fx_cache_hits", "compile_fx_cache_misses",
               "compile_artifacts_loaded", "compile_artifacts_saved_bytes",
               "compile_artifacts_load_s", "worker_start_s", "init_s", "host_trials_before")
FINAL_KEYS = ("val_loss", "final_val_loss", "objective_time_s", "train_time_s", "tokens", "compile_s", "startup_s", "val_time_s",
              "peak_mem_bytes", "floor", "script_exit_code")  # the last: a script's crash after its final validation


def resolve_uri(flag: str | None) -> str:
    """--tracking-uri wins, then MLFLOW_TRACKING_URI, then sqlite:///mlflow.db in the working folder."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())  # workers and the UI chdir elsewhere
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return None  # a tracking server decides


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's source tags (the run list's Source, Version and User columns): the entry point, the git commit of
    this checkout (a dirty tree is said in `code_version`), its branch and remote where known, the user."""
    import getpass

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": os.path.basename(sys.argv[0]) or "speedrun-sweep"}
    for key, value in (("mlflow.source.git.commit", git("rev-parse", "HEAD")),
                       ("mlflow.source.git.branch", git("rev-parse", "--abbrev-ref", "HEAD")),
                       ("mlflow.source.git.repoURL", git("config", "--get", "remote.origin.url"))):
        if value:
            tags[key] = value
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    return tags


def hardware() -> str:
    import torch
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)}x {names[0]}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def _chunks(items, n=100):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def store_lock(uri: str):
    """Held while a driver first opens the store: drivers started together on one new sqlite store raced
    through MLflow's table migrations and left it half-migrated for good (seen in CI: "table
    _alembic_tmp_latest_metrics already exists" on every retry of both drivers). Other stores serialise this
    themselves."""
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        return FileLock(uri[len("sqlite:///"):] + ".lock", timeout=600)
    return contextlib.nullcontext()


class MlflowTracker(tune.Callback):
    def __init__(self, uri: str, experiment: str, sweep_name: str, sweep_params: dict, judge: Judge,
                 total_steps: int, config_for, metric: str = "val_loss", child_kind: str = "trial",
                 child_tags: dict | None = None, tags_for=None, files_for=None, judge_each_run: bool = True):
        with store_lock(uri):  # MlflowClient builds the store (and a new one's tables) at once
            self.client = MlflowClient(tracking_uri=uri)
            self._open(uri, experiment, sweep_name, sweep_params, judge)
        self.uri, self.judge, self.total_steps, self.config_for, self.metric = uri, judge, total_steps, config_for, metric
        self.experiment_name = experiment
        self.track: Track = judge.track
        self.tags_for = tags_for  # params -> extra tags of a trial's run (a record attempt's arm and seed)
        self.files_for = files_for  # trial id -> {artifact name: path}: a trial's own files (its real log)
        self.judge_each_run = judge_each_run  # False: the runs' data is not known (a contributor's script)
        self.fingerprints = Fingerprints()
        self.sweep_name, self.child_kind, self.child_tags = sweep_name, child_kind, dict(child_tags or {})
        self.done: dict[int, dict] = {}  # trial index -> history, verdict, status, run id
        self.runs: dict[str, str] = {}
        self.history: dict[str, list[dict]] = {}
        self.last_step: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.replayed: set[str] = set()
        self.configs: dict = {}  # trial id -> its TrainConfig
        self.names: dict[str, str] = {}  # trial id -> its run name at the start

    def _open(self, uri: str, experiment: str, sweep_name: str, sweep_params: dict, judge: Judge) -> None:
        """The experiment and the sweep's parent run, found or made (the store's tables too, when it is new)."""
        self.source = source_tags()
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location(uri, experiment),
            tags={"mlflow.experimentKind": "custom_model_development"})  # the UI's training-runs view
        found = self.client.search_runs([self.experiment_id], f"tags.sweep_name = '{sweep_name}' and tags.kind = 'sweep'")
        if found:
            self.parent_id = found[0].info.run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=sweep_name,
                                         tags={**self.source, "kind": "sweep", "sweep_name": sweep_name,
                                               "track": judge.track.name,
                                               "track_comparable": str(judge.comparable).lower(),
                                               **({"not_comparable": "; ".join(judge.differences)}
                                                  if judge.differences else {})})
            self.parent_id = run.info.run_id
            track = judge.track
            params = {**sweep_params, "track": track.name, "target_loss": track.target_loss,
                      "record_time_s": track.record_time_s, "track_time_noise_s": track.time_noise,
                      "track_source": track.source,
                      "code_version": code_version(), "hardware": hardware()}
            self.client.log_batch(self.parent_id, params=[Param(k, _value(v)) for k, v in params.items()])

    # ---- Tune callback hooks ---------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        index = trial_index(trial)
        existing = self.client.search_runs(
            [self.experiment_id], f"tags.sweep_name = '{self.sweep_name}' and tags.trial_id = '{trial.trial_id}' "
                                  f"and tags.kind = '{self.child_kind}'")
        ended = [r for r in existing if r.info.status in ("FINISHED", "FAILED", "KILLED")
                 and r.data.tags.get("status") in ENDED]
        if ended:  # it ended before a driver crash; Tune only replays its end (trial.REPLAYED): keep the record
            self.replayed.add(trial.trial_id)
            return
        for run in existing:  # a trial cut off by an interruption starts its record afresh
            self.client.delete_run(run.info.run_id)
        prefix = "trial" if self.child_kind == "trial" else f"{self.child_kind}-{self.child_tags.get('of', '')}"
        params = {k: trial.config[k] for k in trial.config if "." in k}
        extra = self.tags_for(params) if self.tags_for else {}
        if extra.get("arm"):
            prefix = f"{extra['arm']}-seed{extra.get('seed', '')}"
        run = self.client.create_run(self.experiment_id, run_name=f"{prefix}-{index:03d}", tags={**self.source, **extra,
            "mlflow.parentRunId": self.parent_id, "kind": self.child_kind, "sweep_name": self.sweep_name,
            "trial_id": trial.trial_id, "trial_index": str(index), "status": TrialStatus.RUNNING.value,
            "control": str(index == 0 and self.child_kind == "trial").lower(), **self.child_tags})
        self.runs[trial.trial_id] = run.info.run_id
        self.names[trial.trial_id] = f"{prefix}-{index:03d}"
        self.history[trial.trial_id] = []
        cfg = self.configs[trial.trial_id] = self.config_for(params)  # resolved once per trial, reused at its end
        flat = [Param(k, _value(v)) for k, v in sorted(cfg.to_dict().items())]
        for chunk in _chunks(flat):
            self.client.log_batch(run.info.run_id, params=chunk)
        if self.judge_each_run:
            self._log_validation_set(run.info.run_id, cfg)

    def _log_validation_set(self, run_id: str, cfg) -> None:
        """The trial's validation set as the run's dataset input, named by its data and identified by the sha256 of
        the tokens it is measured on (the same fingerprint the tracks hold)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        m = measured(cfg, self.fingerprints)
        source = {"data_dir": cfg.data.data_dir, "val_pattern": m.val_pattern}
        dataset = Dataset(name=f"{m.data_source}-val-{m.val_tokens}", digest=(m.val_sha256 or "unknown")[:20],
                          source_type="local", source=json.dumps(source),
                          profile=json.dumps({"val_tokens": m.val_tokens, "val_sha256": m.val_sha256}))
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context",
                                                                                  "validation")])])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None or result.get(FINISHED):
            return
        step = int(result.get("step", 0))
        ts = int(result["timestamp"] * 1000) if result.get("timestamp") else _now_ms()
        keys = [*REPORT_KEYS, *(k for k in result if k.startswith(SYSTEM_PREFIX))]  # the worker node's system metrics
        metrics = [Metric(k, float(result[k]), ts, step) for k in keys
                   if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if result.get("node_id"):  # the first report: the trial's node
            self.client.log_batch(run_id, tags=[RunTag("node_id", str(result["node_id"])),
                                                RunTag("node_ip", str(result.get("node_ip", "")))])
        if "startup_s" in result and trial.trial_id in self.last_step:  # a second start: Ray Train's retry
            self.history[trial.trial_id] = []
            attempts = self.attempts[trial.trial_id] = self.attempts.get(trial.trial_id, 1) + 1
            self.client.set_tag(run_id, "attempts", str(attempts))
        if "val_loss" in result:
            self.history[trial.trial_id].append({"step": step, "val_loss": result["val_loss"],
                                                 "train_time_s": result.get("train_time_s", 0.0)})
        self.last_step[trial.trial_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=True)

    # ---- the end of a trial ------------------------------------------------------------------------
    def _finish(self, trial, error: bool) -> None:
        self.replayed.discard(trial.trial_id)
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is None:
            return
        last = trial.last_result or {}
        history = self.history.pop(trial.trial_id, [])
        if error:
            status = TrialStatus.FAILED
        elif last.get(FINISHED):
            status = TrialStatus(last.get("status", "finished"))  # finished | diverged
        else:
            status = TrialStatus.PRUNED
        status = reason = status.value
        finals = {k: float(last[k]) for k in FINAL_KEYS
                  if isinstance(last.get(k), (int, float)) and math.isfinite(float(last[k]))}
        cfg = self.trial_config(trial)
        # a searched knob may change what a trial measures; a script's data is not known (script_plan.py)
        judge = self.judge.for_run(measured(cfg, self.fingerprints)) if self.judge_each_run else self.judge
        verdict = judge.verdict(status, finals.get("val_loss"), finals.get("train_time_s"))
        reached = status == TrialStatus.FINISHED and finals.get("val_loss", math.inf) <= self.track.target_loss
        if reached:  # the run's end-of-run time (records.py): never a mid-run crossing
            finals["time_to_target_s"] = finals["train_time_s"]
        step = self.last_step.get(trial.trial_id, 0)
        # the run list's first column then says what a user looks for first: the final loss and the verdict
        name = self.names.pop(trial.trial_id, f"trial-{trial_index(trial):03d}")
        loss = f" {finals['val_loss']:.4f}" if status == TrialStatus.FINISHED and "val_loss" in finals else ""
        headline = f"{name}{loss} {verdict}"
        tags = [RunTag("status", status), RunTag("stop_reason", reason), RunTag("verdict", verdict),
                RunTag("mlflow.runName", headline),
                RunTag("reached_target", str(reached).lower()), RunTag("track", self.track.name),
                RunTag("comparable", str(judge.comparable).lower())]
        if judge.differences:
            tags.append(RunTag("not_comparable", "; ".join(judge.differences)))
        self.client.log_batch(run_id, metrics=[Metric(k, v, _now_ms(), step) for k, v in finals.items()], tags=tags)
        line = error_file_line(trial.error_file, 500) if error else None
        if line:
            self.client.set_tag(run_id, "error", line)
        self.done[trial_index(trial)] = {"history": history, "verdict": verdict, "status": status, "run_id": run_id,
                                         "reached": reached}
        self._trial_artifacts(run_id, trial, history, last)
        self.client.set_terminated(run_id, RUN_STATUS.get(status, "FINISHED"))
        if os.environ.get(KILL_DRIVER_ENV) == str(trial_index(trial)):  # test-only: the worst moment to die
            os.kill(os.getpid(), signal.SIGKILL)

    def trial_config(self, trial):
        """The trial's config as resolved at its start (after a driver restart: resolved again, once)."""
        if trial.trial_id not in self.configs:
            self.configs[trial.trial_id] = self.config_for({k: trial.config[k] for k in trial.config if "." in k})
        return self.configs[trial.trial_id]

    def _trial_artifacts(self, run_id, trial, history, last) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "config.json").write_text(self.trial_config(trial).to_json())
            lines = [f"# trial {trial_index(trial)} of sweep {self.sweep_name} ({trial.trial_id}); "
                     f"track {self.track.name}: target {self.track.target_loss}, record {self.track.record_time_s}s"]
            for h in history:
                ms = h["train_time_s"] * 1000
                lines.append(f"step:{h['step']}/{self.total_steps} val_loss:{h['val_loss']:.4f} "
                             f"train_time:{ms:.0f}ms step_avg:{ms / max(h['step'], 1):.2f}ms")
            if "peak_mem_bytes" in last:
                lines.append(f"peak memory allocated: {last['peak_mem_bytes'] / 2**20:.0f} MiB")
            (tmp / "train.log").write_text("\n".join(lines) + "\n")
            (tmp / "history.json").write_text(json.dumps(history))
            for name, path in (self.files_for(trial.trial_id) if self.files_for else {}).items():
                if path.exists():  # the script's own log replaces the rebuilt train.log
                    shutil.copyfile(path, tmp / name)
                    if name == "code.json":  # the patched file's hash, to find every trial that ran the same code
                        code = json.loads(path.read_text())
                        self.client.set_tag(run_id, "code_sha256", code["code_sha256"])
                        self.client.set_tag(run_id, "source_sha256", code["source_sha256"])
            if history:
                plot_curves({f"trial {trial_index(trial)}": history}, self.track, tmp / "loss_vs_time.png")
            self.client.log_artifacts(run_id, str(tmp))

    # ---- interruption and resume: MLflow is the durable record ------------------------------------
    def _children(self) -> list:
        return self.client.search_runs(
            [self.experiment_id], f"tags.sweep_name = '{self.sweep_name}' and tags.kind = '{self.child_kind}'",
            max_results=50_000)

    def load_done(self) -> None:
        """Rebuild the per-trial record (status, history, verdict) from MLflow: after a resume, trials that
        ended in an earlier driver are known only there."""
        for run in self._children():
            tags = run.data.tags
            if tags.get("status") in (None, TrialStatus.RUNNING, TrialStatus.INTERRUPTED) or "trial_index" not in tags:
                continue
            index = int(tags["trial_index"])
            if index in self.done:
                continue
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    local = self.client.download_artifacts(run.info.run_id, "history.json", tmp)
                    history = json.loads(Path(local).read_text())
            except Exception:  # no curve recorded (a run that failed before its first validation)
                history = []
            self.done[index] = {"history": history, "verdict": tags.get("verdict", tags["status"]),
                                "status": tags["status"], "run_id": run.info.run_id,
                                "reached": tags.get("reached_target") == "true"}

    def mark_interrupted(self) -> None:
        """The driver stopped before the sweep ended: trials it left running are KILLED, the parent too."""
        for run in self._children():
            if run.data.tags.get("status") == TrialStatus.RUNNING:
                self.client.set_tag(run.info.run_id, "status", TrialStatus.INTERRUPTED.value)
                self.client.set_tag(run.info.run_id, "stop_reason", TrialStatus.INTERRUPTED.value)
                self.client.set_terminated(run.info.run_id, "KILLED")
        self.client.set_tag(self.parent_id, "status", TrialStatus.INTERRUPTED.value)
        self.client.set_terminated(self.parent_id, "KILLED")

    def reopen(self) -> None:
        """--resume: the parent run is running again."""
        self.client.update_run(self.parent_id, status="RUNNING")
        self.client.set_tag(self.parent_id, "status", TrialStatus.RUNNING.value)
        self.client.set_tag(self.parent_id, "resumed", "true")

    # ---- the end of the sweep ----------------------------------------------------------------------
    def finish_sweep(self, rows: list[dict], curves: dict[str, list[dict]] | None = None,
                     pareto: list[dict] | None = None, split=None) -> None:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        candidates = [r for r in rows if r.get("verdict") == CANDIDATE]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if rows:
                pacsv.write_csv(pa.Table.from_pylist(rows), tmp / "leaderboard.csv")
            if curves:
                plot_curves(curves, self.track, tmp / "all_trials.png")
            if pareto:
                pacsv.write_csv(pa.Table.from_pylist(pareto), tmp / "pareto_front.csv")
            self.client.log_artifacts(self.parent_id, str(tmp))
        if pareto:
            self.client.set_tag(self.parent_id, "pareto_front", ",".join(str(r["trial_index"]) for r in pareto))
            for r in pareto:
                if r.get("mlflow_run_id"):
                    self.client.set_tag(r["mlflow_run_id"], "pareto", "true")
        now = _now_ms()
        self.client.log_batch(self.parent_id, metrics=[
            Metric("n_trials", len(rows), now, 0), Metric("n_candidates", len(candidates), now, 0)] + [
            Metric("best_val_loss", min(r["val_loss"] for r in rows if r.get("val_loss") is not None), now, 0)]
            if any(r.get("val_loss") is not None for r in rows) else [])
        if split is not None:  # device-seconds by use (results.TimeSplit)
            self.client.log_batch(self.parent_id, metrics=[
                Metric(f"device_s_{k}", v, now, 0) for k, v in split.parts().items()] + [
                Metric("device_s_total", split.total, now, 0),
                Metric("training_share", split.training / split.total if split.total else 0.0, now, 0)])
        self.client.set_tag(self.parent_id, "status", TrialStatus.FINISHED.value)
        self.client.set_terminated(self.parent_id, "FINISHED")

    def annotate(self, rows: list[dict]) -> list[dict]:
        """Add each trial's verdict (records.py's words) and its MLflow run id to its results row."""
        for r in rows:
            d = self.done.get(r["trial_index"])
            if d:
                r["status"] = d["status"]  # the driver saw how it ended; the grid cannot tell pruned from cut off
                reached = d["reached"]
                r.update(verdict=d["verdict"], reached_target=reached, mlflow_run_id=d["run_id"],
                         time_to_target_s=r.get("train_time_s") if reached else None)
            else:  # it never ended while a driver watched: cut off by an interruption, or never started
                r.update(status=INTERRUPTED, verdict=INTERRUPTED, reached_target=False, mlflow_run_id=None)
        return rows

    def for_reruns(self, config_for, of: int) -> "MlflowTracker":
        """A tracker of the same sweep for --confirm-top's re-runs of trial `of` (child runs kind=confirm)."""
        return MlflowTracker(self.uri, self.experiment_name, self.sweep_name, {}, self.judge, self.total_steps,
                             config_for, self.metric, child_kind="confirm", child_tags={"of": str(of)})

    def log_confirmed(self, confirmed: list[dict]) -> None:
        """--confirm-top's ranking on the sweep's parent run: confirm.json, mean losses, verdict words."""
        self.client.log_text(self.parent_id, json.dumps(confirmed, indent=1), "confirm.json")
        self.client.log_batch(self.parent_id, metrics=[
            Metric(f"confirm_mean_val_loss_trial_{c['trial_index']}", c["mean_val_loss"], _now_ms(), 0)
            for c in confirmed if math.isfinite(c["mean_val_loss"])], tags=[
            RunTag(f"confirm_verdict_trial_{c['trial_index']}", c["verdict"]) for c in confirmed])

    def log_attempt(self, name: str, accepted: bool, verdict: str, numbers: dict[str, float],
                    files: list[Path]) -> None:
        """A record attempt's acceptance test on its parent run (record.py): metrics, verdict tags, files."""
        self.client.log_batch(self.parent_id, metrics=[Metric(k, v, _now_ms(), 0) for k, v in numbers.items()],
                              tags=[RunTag("accepted", str(accepted).lower()), RunTag("verdict", verdict),
                                    RunTag("attempt", "record"), RunTag("mlflow.runName", f"record attempt {name}")])
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, "FINISHED")

    def curves(self) -> dict[str, list[dict]]:
        return {f"trial {i}" + (" (control)" if i == 0 else ""): d["history"]
                for i, d in sorted(self.done.items()) if d["history"]}

    def ui_hint(self) -> str:
        """The command that opens this sweep in MLflow's UI, pasteable as printed: the mlflow beside this
        interpreter, the small-machine settings (one worker, no job runner), the runs table of this sweep."""
        import shlex
        import sys
        import urllib.parse

        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = f"{mlflow_bin if mlflow_bin.exists() else 'mlflow'}"
        query = urllib.parse.quote(f"tags.sweep_name = '{self.sweep_name}' and tags.kind = '{self.child_kind}'")
        order = urllib.parse.quote(f"metrics.`{self.metric}`")
        return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {cmd} ui --workers 1 --backend-store-uri "
                f"{shlex.quote(self.uri)}\n  then open http://127.0.0.1:5000/#/experiments/{self.experiment_id}"
                f"/runs?workflowType=machine_learning&searchFilter={query}&orderByKey={order}&orderByAsc=true  "
                f"(this sweep's trials, best first, in the UI's model-training view; its default is GenAI)")


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)


def plot_curves(curves: dict[str, list[dict]], track: Track, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, history in curves.items():
        ax.plot([h["train_time_s"] for h in history], [h["val_loss"] for h in history], marker="o", ms=3,
                label=label)
    ax.axhline(track.target_loss, color="k", ls="--", lw=1, label=f"target {track.target_loss}")
    t_max = max((h["train_time_s"] for hs in curves.values() for h in hs), default=1.0) or 1.0
    if track.record_time_s > 0:
        if track.record_time_s <= 3 * t_max:
            ax.axvline(track.record_time_s, color="r", ls=":", lw=1, label=f"record {track.record_time_s:g}s")
            ax.set_xlim(0, 1.05 * max(t_max, track.record_time_s))
        else:  # far off to the right: say where, rather than squash the curves
            ax.set_xlim(0, 1.05 * t_max)
            ax.annotate(f"record {track.record_time_s:g}s →", xy=(0.98, 0.5), xycoords="axes fraction",
                        ha="right", color="r", fontsize=8)
    finite = [h["val_loss"] for hs in curves.values() for h in hs if math.isfinite(h["val_loss"])]
    if finite:
        ax.set_ylim(min(finite + [track.target_loss]) - 0.05, min(max(finite), track.target_loss + 3))
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation loss against training time ({track.name})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
