"""Compile caches shared by a sweep's trials: what recompiles, signatures, and portable artifacts that make a
fresh process (another node: its own empty Inductor cache) compile nothing.

The artifact test compiles with the real Inductor on the CPU (a C++ compiler builds the kernels) in separate
processes, each with its own empty TORCHINDUCTOR_CACHE_DIR, as separate Ray nodes would have.
"""

import json
import os
import subprocess
import sys

import pytest

from speedrun.config import TrainConfig, graph_signature, recompiles
from sweeps.compile_cache import ArtifactStore, signature_key

COMPILE_ONCE = r"""
import json, sys, torch
from sweeps.compile_cache import ArtifactStore, compile_counters
store, mode = ArtifactStore(sys.argv[1]), sys.argv[2]
loaded = store.load("k") if mode in ("load", "load+save") else False
lin = torch.nn.Linear(32, 32)
f = torch.compile(lambda x: torch.nn.functional.gelu(lin(x)).square().sum(), fullgraph=True, dynamic=False)
x = torch.randn(8, 32)
f(x).backward()
f(x * 2).backward()  # same shape: no new graph
saved = store.save("k") if mode in ("save", "load+save") else 0
print(json.dumps({"loaded": loaded, "saved": saved, **compile_counters()}))
"""


def test_learning_rates_do_not_change_the_signature_but_windows_do():
    base = TrainConfig.preset("record")
    lr = base.override({"optim.muon_lr": 0.05, "optim.adam_lr": 0.02, "model.softcap_scale": 20.0,
                        "optim.muon_wd": 0.4, "schedule.cooldown_frac": 0.5})
    win = base.override({"schedule.long_windows.2": 12})
    assert graph_signature(lr) == graph_signature(base)
    assert graph_signature(win) != graph_signature(base)
    assert signature_key(lr, 8) == signature_key(base, 8) != signature_key(win, 8)
    assert signature_key(base, 8) != signature_key(base, 1)  # micro-batches per rank differ
    assert not recompiles("optim.muon_lr") and recompiles("schedule.short_windows.0")
    assert recompiles("data.max_micro_batch_tokens") and not recompiles("schedule.num_scheduled_steps")


def _compile_in_fresh_process(tmp_path, name, store, mode):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", COMPILE_ONCE, store, mode], env=env, capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not any(os.access(os.path.join(d, "g++"), os.X_OK) for d in os.environ["PATH"].split(":")),
                    reason="Inductor on the CPU needs a C++ compiler")
def test_artifacts_saved_by_one_process_warm_another(tmp_path):
    store = str(tmp_path / "sweep" / "compile_cache")
    first = _compile_in_fresh_process(tmp_path, "first", store, "save")
    assert first["fx_cache_misses"] > 0 and first["saved"] > 0
    assert ArtifactStore(store).has("k")
    again = _compile_in_fresh_process(tmp_path, "again", store, "load+save")  # a later trial: loads, saves nothing
    assert again["loaded"] and again["saved"] == 0
    assert again["fx_cache_misses"] == 0 and again["fx_cache_hits"] == first["fx_cache_misses"]
    cold = _compile_in_fresh_process(tmp_path, "cold", store, "none")  # the control: no artifacts, all misses
    assert cold["fx_cache_hits"] == 0 and cold["fx_cache_misses"] == first["fx_cache_misses"]


CUSTOM_FUNCTION_GRAPH = r"""
import json, sys, torch
from sweeps.compile_cache import compile_counters
from speedrun.train import configure_compiler

class ScaledSquare(torch.autograd.Function):  # a custom autograd.Function, as speedrun.fp8's matmuls are
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 3.0 * x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 6.0 * x * grad

lin = torch.nn.Linear(16, 16)
def step(fn, x):
    torch.compile(fn, fullgraph=True, dynamic=False)(x).backward()
    return dict(compile_counters())
x = torch.randn(4, 16)
out = {}
if sys.argv[1] == "default":  # torch's defaults first: the graph is not cached
    out["default"] = step(lambda x: ScaledSquare.apply(lin(x)).sum(), x)
configure_compiler()
out["configured"] = step(lambda x: ScaledSquare.apply(lin(x)).mean(), x)
print(json.dumps(out))
"""


@pytest.mark.skipif(not any(os.access(os.path.join(d, "g++"), os.X_OK) for d in os.environ["PATH"].split(":")),
                    reason="Inductor on the CPU needs a C++ compiler")
def test_graphs_with_custom_autograd_functions_are_cached(tmp_path):
    """By default AOTAutograd will not cache a graph holding a custom autograd.Function (every process traced
    and partitioned the record model's training graph again); configure_compiler lets it, and a second
    process with the same cache folder loads the graph instead."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}

    def run(mode):
        out = subprocess.run([sys.executable, "-c", CUSTOM_FUNCTION_GRAPH, mode], env=env, capture_output=True,
                             text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run("default")
    assert first["default"]["aot_cache_bypasses"] == 1 and first["default"]["aot_cache_misses"] == 0
    configured = {k: first["configured"][k] - first["default"][k] for k in first["configured"]}
    assert configured["aot_cache_bypasses"] == 0 and configured["aot_cache_misses"] == 1
    second = run("configured")["configured"]
    assert second["aot_cache_hits"] == 1 and second["aot_cache_misses"] == 0 and second["aot_cache_bypasses"] == 0


def test_every_process_of_a_sweep_shares_its_inductor_and_triton_caches(tmp_path, monkeypatch):
    from sweeps.cluster import trial_env

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    env = trial_env(tmp_path / "sweep", cpus_per_worker=2)
    inductor, triton = env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"]
    assert os.path.commonpath([inductor, str(tmp_path / "sweep")]) == str(tmp_path / "sweep")
    assert os.path.commonpath([inductor, triton]) == inductor  # one folder to keep or delete


def test_a_node_that_holds_a_signatures_artifacts_does_not_load_them_again(tmp_path, monkeypatch):
    """The marker in the node's Inductor cache folder skips the load (117 MB for the record model). Without it
    the store is read; a damaged file counts as not loaded and marks nothing."""
    from sweeps.trial import WarmStart

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    root = tmp_path / "compile_cache"
    root.mkdir()
    (root / "k.megacache").write_bytes(b"not a cache artifact")
    warm = WarmStart(ArtifactStore(str(root)), "k", rank=0)
    warm.load_unless_node_has_them()
    assert warm.load_s > 0 and not warm.loaded and not os.path.exists(WarmStart.node_marker("k"))
    skipped = WarmStart(ArtifactStore(str(root)), "k", rank=0)
    skipped.mark_node()
    skipped.load_unless_node_has_them()
    assert skipped.load_s == 0.0 and not skipped.loaded


def test_a_trial_counts_only_what_it_compiled():
    """On a warm host (--reuse-workers) the process's dynamo counters already hold the trials before it: a trial
    reports what changed since its start."""
    from torch._dynamo.utils import counters

    from sweeps.trial import WarmStart

    counters["stats"]["unique_graphs"] += 5  # an earlier trial of this process
    warm = WarmStart.begin(TrainConfig.preset("tiny"), "", rank=0)
    assert warm.after_warmup()["compile_graphs"] == 0
    counters["stats"]["unique_graphs"] += 2  # this trial's
    assert warm.after_warmup()["compile_graphs"] == 2
