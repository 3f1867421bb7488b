"""MLflow records of real sweeps: parent and child runs, params, per-step metrics, tags, verdicts (the
"reached" side: tests/test_verdicts.py), artifacts, the leaderboard read back, and the MLflow UI (a real server, headless
Chromium). The trials are comparable with the tests' `quick` track (conftest.quick_track)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from speedrun.config import TrainConfig
from sweeps import report as report_cli

pytestmark = pytest.mark.slow
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture
def store(shared_sweep):
    """(folder, MLflow URI) of the shared muon_lr sweep (conftest.shared_sweep): 2 trials run to the end side by
    side, judged against the quick track (target 3.8, record time 1e6 s)."""
    return shared_sweep.folder, shared_sweep.uri


def trial_runs(client, exp_id, sweep):
    return client.search_runs([exp_id], f"tags.kind = 'trial' and tags.sweep_name = '{sweep}'")


def test_parent_children_params_metrics_tags(store):
    root, uri = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("muon_lr")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'sweep' and tags.sweep_name = 's'")
    assert len(parents) == 1
    parent = parents[0]
    for key in ("space", "searcher", "scheduler", "trials", "preset", "track", "code_version", "hardware"):
        assert key in parent.data.params
    assert parent.data.params["preset"] == "tiny" and parent.data.params["track"] == "quick"
    assert parent.data.tags["track_comparable"] == "true"
    children = trial_runs(client, exp.experiment_id, "s")
    assert len(children) == 2
    n_knobs = len(TrainConfig.preset("tiny").to_dict())
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert len(run.data.params) == n_knobs  # every config value as a flat dotted param
        for tag in ("trial_id", "status", "verdict", "stop_reason", "comparable"):
            assert tag in run.data.tags
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert len({m.step for m in history}) >= 5  # one point per validation, keyed by training step
        for metric in ("val_loss", "train_time_s", "time_to_target_s", "tokens", "compile_s", "startup_s"):
            assert metric in run.data.metrics
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "train.log", "loss_vs_time.png"} <= arts
    control = next(r for r in children if r.data.tags["trial_index"] == "0")
    assert control.data.params["optim.muon_lr"] == str(TrainConfig.preset("tiny").optim.muon_lr)
    for run in children:  # below 3.8 at the end: a candidate (long before 1e6 s) with its end-of-run time
        reached = run.data.metrics["val_loss"] <= 3.8
        assert run.data.tags["verdict"] == ("candidate" if reached else "missed")
        assert (run.data.metrics.get("time_to_target_s") == run.data.metrics["train_time_s"]) is reached
    assert control.data.tags["verdict"] == "candidate"
    assert control.info.run_name == f"trial-000 {control.data.metrics['val_loss']:.4f} candidate"  # the list's headline
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"leaderboard.csv", "all_trials.png"}
    log = Path(client.download_artifacts(control.info.run_id, "train.log", str(root))).read_text()
    assert log.startswith("# code version:") and "step:12/12 val_loss:" in log  # the worker's own log


def test_runs_carry_source_system_metrics_and_their_validation_set(store):
    """MLflow's conventions: the git commit, entry point and user (the run list's Source/Version/User columns),
    the worker node's system metrics, the validation set as a dataset input with its fingerprint, and the
    parent's metrics with real timestamps."""
    from sweeps.records import get_track

    root, uri = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("muon_lr")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                            text=True).stdout.strip()
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep' and tags.sweep_name = 's'")
    for run in [parent, *trial_runs(client, exp.experiment_id, "s")]:
        assert run.data.tags["mlflow.source.git.commit"] == commit and run.data.tags["mlflow.user"]
        assert run.data.tags["mlflow.source.name"]
    assert all(m.timestamp > 0 for m in client.get_metric_history(parent.info.run_id, "n_trials"))
    for run in trial_runs(client, exp.experiment_id, "s"):
        cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert cpu and all(0 <= m.value <= 100 for m in cpu)
        assert client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")[0].value > 0
        (inp,) = run.inputs.dataset_inputs
        assert inp.dataset.digest == get_track("quick").val_sha256[:20]
        assert inp.dataset.name == "sample-val-4096" and {t.key: t.value for t in inp.tags} == {
            "mlflow.data.context": "validation"}


def test_report_reads_the_leaderboard_back(store, capsys):
    root, uri = store
    rows = report_cli.leaderboard(uri, "muon_lr", "s")
    assert len(rows) == 2 and rows[0]["val_loss"] <= rows[1]["val_loss"]
    words = [r["verdict"] for r in rows]
    assert set(words) <= {"candidate", "missed"} and "candidate" in words and [r["steps"] for r in rows] == [12, 12]
    assert report_cli.main(["--space", "muon_lr", "--sweep", "s", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"{words.count('candidate')} candidate(s)" in out


def store_hint(uri: str) -> str:
    """What the sweep CLI prints at its end to open the shared sweep's trials in the UI."""
    from sweeps.records import get_track
    from sweeps.records import Judge
    from sweeps.tracking import MlflowTracker

    tracker = MlflowTracker(uri, "muon_lr", "s", {}, Judge(get_track("quick")), 12, None)
    return tracker.ui_hint()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(chromium, profile, url, needles, screenshot):
    """Load `url` in headless Chromium until every needle is on the page, then screenshot it. The page's charts load
    lazily and a 2-core CI machine renders slowly, so the (virtual) time allowed grows over four attempts."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"]
    screenshot.unlink(missing_ok=True)
    for attempt, budget_ms in enumerate((20_000, 60_000, 120_000, 240_000)):
        dom = subprocess.run([chromium, *flags, f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}-{attempt}",
                              "--dump-dom", url], capture_output=True, text=True, timeout=300).stdout
        missing = [n for n in needles if n not in dom]
        if not missing:
            break
    assert not missing, f"{url}: {missing} not on the page after {budget_ms} ms of virtual time"
    subprocess.run([chromium, *flags, f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}-shot",
                    f"--screenshot={screenshot}", url], capture_output=True, timeout=300)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000


@pytest.mark.long
def test_mlflow_ui_shows_the_trials(store, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    root, uri = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("muon_lr")
    runs = trial_runs(client, exp.experiment_id, "s")
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not come up in 90 s"
                assert server.poll() is None, "mlflow server exited"
                time.sleep(1)
        ids = ",".join(f"%22{r.info.run_id}%22" for r in runs)
        url = f"http://127.0.0.1:{port}/#/compare-runs?runs=[{ids}]&experiments=[%22{exp.experiment_id}%22]"
        OUTPUT.mkdir(exist_ok=True)
        render(chromium, tmp_path / "compare", url, [r.info.run_name for r in runs] + ["optim.muon_lr"],
               OUTPUT / "mlflow_ui_compare.png")
        # the run list as ui_hint opens it (model-training view) and a trial's system metrics tab
        hint_url = next(w for w in store_hint(uri).split() if w.startswith("http"))
        client_url = hint_url.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        render(chromium, tmp_path / "runs", client_url, ["Model training", "Runs"], OUTPUT / "mlflow_ui_runs.png")
        # a trial's overview: its source with the git commit, the validation set as a dataset input, system metrics
        run = runs[0]
        commit = run.data.tags["mlflow.source.git.commit"][:7]
        (dataset,) = [i.dataset.name for i in client.get_run(run.info.run_id).inputs.dataset_inputs]
        overview = (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                    "?workflowType=machine_learning")
        render(chromium, tmp_path / "overview", overview, [commit, dataset, "system/cpu_utilization_percentage"],
               OUTPUT / "mlflow_ui_overview.png")
        system = (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}/system-metrics"
                  "?workflowType=machine_learning")
        render(chromium, tmp_path / "system", system, ["cpu_utilization_percentage", "system_memory_usage_megabytes"],
               OUTPUT / "mlflow_ui_system_metrics.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
