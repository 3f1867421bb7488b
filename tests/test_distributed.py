"""torchrun with 2 CPU ranks (gloo) follows the same loss curve as one process: the global batch is fixed."""

import json
import os
import subprocess
import sys

import pytest

# 20 steps of 1,024 then 2,048 tokens in 512-token micro-batches: one micro-batch per rank, then two (accumulated)
ARGS = ["--preset", "tiny", "--steps", "20", "--set", "data.val_tokens=8192", "--set", "run.val_every=5",
        "--set", "schedule.tokens_per_step=[1024,1024,2048,2048]", "--set", "data.max_micro_batch_tokens=512"]


def run(cmd, out, env):
    proc = subprocess.run(cmd + ARGS + ["--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, _ = run([sys.executable, "-m", "speedrun"], tmp_path / "one.json", env)
    two, out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "speedrun"], tmp_path / "two.json", env)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert out.count("val_loss:") == len(two["history"])  # only rank 0 prints
    a = [h["val_loss"] for h in one["history"]]
    b = [h["val_loss"] for h in two["history"]]
    assert len(a) == len(b) == 5
    assert a[-1] < a[0] - 1.0
    for x, y in zip(a, b):
        assert abs(x - y) < 0.02, (a, b)  # same data, same maths; only the summation order differs
    assert one["tokens"] == two["tokens"]
