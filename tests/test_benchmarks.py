"""The speed benchmarks run on a CPU (their smoke presets) and say whether the run they timed still trained."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_prints_each_stages_last_loss():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny",
                          "--stage", "1", "--steps", "3", "--warmup", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| stage"))
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 1 |"))
    assert header.rstrip(" |").endswith("last loss")
    assert 5.0 < float(row.strip(" |").split("|")[-1]) < 12.0  # tiny's loss after 4 steps from ln(vocab)
    assert "not finite" not in out.stdout


def test_throughput_flags_a_diverged_run():
    """An absurd Adam learning rate makes the loss non-finite; the benchmark says its speed is of a diverged run."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny",
                          "--stage", "1", "--steps", "3", "--warmup", "1", "--set", "optim.adam_lr=1e30",
                          "--set", "optim.muon_lr=1e30"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the training loss is not finite" in out.stdout
