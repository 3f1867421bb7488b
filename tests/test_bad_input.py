"""Bad input to `sweeps/run.py`: one clear `error:` line naming the problem and the fix, exit code 2, and
no Ray started (no compute spent)."""

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import ray

from speedrun.data import write_shard
from sweeps import run as sweep_cli
from sweeps.cluster import BadInput, check_capacity
from sweeps.plan import check_tracking_uri


def refused(capsys, *argv) -> str:
    rc = sweep_cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert not ray.is_initialized()
    return lines[0]


def write_space(tmp_path: Path, param: str) -> str:
    path = tmp_path / "my.toml"
    path.write_text('description = "t"\n[defaults]\ntrials = 2\nsteps = 10\n' + param)
    return str(path)


def test_unknown_space_lists_the_known_ones(capsys):
    line = refused(capsys, "--space", "nope", "--preset", "tiny")
    assert "unknown space 'nope'" in line and "muon_lr" in line and "windows" in line


def test_space_key_that_is_not_a_config_field(capsys, tmp_path):
    space = write_space(tmp_path, '[params."optim.muon_lrr"]\ntype = "float"\nlow = 0.01\nhigh = 0.05\n')
    line = refused(capsys, "--space", space, "--preset", "tiny")
    assert "optim.muon_lrr" in line


def test_low_above_high(capsys, tmp_path):
    space = write_space(tmp_path, '[params."optim.muon_lr"]\ntype = "float"\nlow = 0.05\nhigh = 0.01\n')
    line = refused(capsys, "--space", space, "--preset", "tiny")
    assert "low=0.05 > high=0.01" in line and "swap" in line


def test_value_out_of_the_knobs_valid_range(capsys, tmp_path):
    space = write_space(tmp_path, '[params."optim.muon_momentum"]\ntype = "float"\nlow = 0.8\nhigh = 1.5\n')
    line = refused(capsys, "--space", space, "--preset", "tiny")
    assert "optim.muon_momentum" in line and "1.5" in line and "[0, 1)" in line


def test_missing_data_folder(capsys, tmp_path):
    line = refused(capsys, "--space", "muon_lr", "--preset", "record", "--data", str(tmp_path / "absent"))
    assert "does not exist" in line and "download" in line


def test_empty_shard_glob(capsys, tmp_path):
    line = refused(capsys, "--space", "muon_lr", "--preset", "record", "--data", str(tmp_path))
    assert "no shards match" in line and "fineweb_train_" in line


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_corrupt_shard(capsys, tmp_path, damage):
    tokens = np.arange(1000) % 50257
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    bad = write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    raw = bytearray(bad.read_bytes())
    if damage == "magic":
        raw[:4] = np.int32(12345).tobytes()
    else:
        raw = raw[:-100]
    bad.write_bytes(bytes(raw))
    line = refused(capsys, "--space", "muon_lr", "--preset", "record", "--data", str(tmp_path))
    assert "fineweb_train_000001.bin" in line
    assert ("wrong magic" in line) if damage == "magic" else ("truncated" in line)


def test_unreachable_tracking_uri(capsys):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--tracking-uri", "http://127.0.0.1:9")
    assert "http://127.0.0.1:9" in line and "not reachable" in line


def test_tracking_server_that_answers_is_accepted_by_the_check():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_uri(f"http://127.0.0.1:{server.server_port}")  # no BadInput
    finally:
        server.shutdown()


def test_more_gpus_per_trial_than_the_machine_has(capsys):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--gpus-per-worker", "1",
                   "--workers-per-trial", "2")
    assert "needs 2 GPUs" in line


def test_more_gpus_per_trial_than_the_cluster_has():
    with pytest.raises(BadInput, match="the Ray cluster has 8 GPUs|the Ray cluster has 8"):
        check_capacity({"CPU": 128, "GPU": 8}, "the Ray cluster", 16, True, 1.0, 1.0)
    check_capacity({"CPU": 128, "GPU": 8}, "the Ray cluster", 8, True, 1.0, 1.0)


def test_reused_workers_need_one_worker_trials(capsys):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--reuse-workers", "--workers-per-trial", "2",
                   "--cpus-per-worker", "0.5")
    assert "--reuse-workers" in line and "--workers-per-trial 1" in line


def test_resume_of_a_sweep_that_does_not_exist(capsys, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sweep.json").write_text("{}")
    line = refused(capsys, "--resume", "--name", "nope", "--storage", str(tmp_path))
    assert "no sweep named 'nope'" in line and "other" in line


def test_resume_refuses_a_changed_setting(capsys, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text('{"space": "muon_lr", "trials": 4}')
    line = refused(capsys, "--resume", "--name", "s", "--storage", str(tmp_path), "--trials", "9")
    assert "drop --trials" in line


def test_an_existing_sweep_name_needs_resume(capsys, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--name", "s", "--storage", str(tmp_path))
    assert "already exists" in line and "--resume" in line


def test_bad_fault_spec(capsys):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--inject-faults", "x:sometimes")
    assert "--inject-faults" in line


def folder_digest(folder: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()


def test_corrupt_data_without_a_preset_is_refused_fast_and_left_untouched(capsys, tmp_path, monkeypatch):
    """No --preset on a CPU machine: --data still means the user's FineWeb shards, never the sample corpus."""
    import subprocess
    import sys
    import time

    tokens = np.arange(1000) % 50257
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    bad = write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    bad.write_bytes(bad.read_bytes()[:-10])
    before = folder_digest(tmp_path)
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(sweep_cli.__file__)), "--space", "muon_lr", "--data",
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    elapsed = time.time() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "fineweb_train_000001.bin" in errors[0] and "truncated" in errors[0]
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert folder_digest(tmp_path) == before  # nothing written into the user's folder
    assert not list(tmp_path.glob("sample_*"))


def test_track1_on_the_sample_corpus_is_refused(capsys, tmp_path):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--track", "track1",
                   "--storage", str(tmp_path))
    assert "--track track1 does not hold" in line and "data sample" in line


def test_time_objective_needs_a_comparable_track(capsys, tmp_path):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--steps", "30", "--objective", "time",
                   "--storage", str(tmp_path))
    assert "not comparable" in line and "30 steps" in line


@pytest.mark.parametrize("flag, value, words", [("--trials", "0", "at least 1 trial"),
                                                 ("--max-failures", "-1", "must be >= 0")])
def test_zero_and_negative_counts_are_refused(capsys, tmp_path, flag, value, words):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", flag, value, "--storage", str(tmp_path))
    assert flag in line and words in line


def test_a_searched_knob_cannot_also_be_set(capsys, tmp_path):
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--set", "optim.muon_lr=0.01",
                   "--storage", str(tmp_path))
    assert "--set optim.muon_lr" in line and "searches that knob" in line


def test_a_second_driver_on_one_sweep_folder_is_refused(capsys, tmp_path):
    import json
    import os
    import socket

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "driver.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    line = refused(capsys, "--space", "muon_lr", "--preset", "tiny", "--name", "s", "--storage", str(tmp_path),
                   "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert "another driver runs sweep folder" in line and str(os.getpid()) in line


def test_a_dead_drivers_lock_is_taken_over(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from sweeps.driver_lock import DriverLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "driver.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead)}))
    with DriverLock(tmp_path):
        assert json.loads((tmp_path / "driver.lock").read_text())["pid"] != int(dead)
        with pytest.raises(BadInput, match="another driver"):
            DriverLock(tmp_path).__enter__()
    assert not (tmp_path / "driver.lock").exists()
