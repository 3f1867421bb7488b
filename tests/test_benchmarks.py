"""The speed benchmarks run on a CPU (their smoke presets) and say whether the run they timed still trained."""

import gzip
import json
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


def test_throughput_profile_writes_tables_and_a_trace(tmp_path):
    """--profile writes the op table and the same split by input shape; --trace a gzipped Chrome trace."""
    table, trace = tmp_path / "prof.txt", tmp_path / "trace.json.gz"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny",
                          "--stage", "1", "--steps", "1", "--warmup", "1", "--profile", str(table), "--trace", str(trace),
                          "--compile-times"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = table.read_text()
    assert "aten::mm" in text and "Input Shapes" in text  # the second table groups by shape
    events = json.loads(gzip.open(trace).read())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert "# compilations up to stage 1" in out.stdout


def test_compile_metrics_name_each_compiled_frame(capsys):
    """What --compile-times prints for a real (eager-backend) compilation: the frame and its phase seconds."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)

    def double_sine(x):
        return x.sin() * 2

    torch.compile(double_sine, backend="eager")(torch.ones(3))
    throughput.print_compile_metrics(1)
    assert any(line.startswith("#  double_sine frame ") for line in capsys.readouterr().out.splitlines())


def test_kernel_summary_splits_gpu_time_by_family_and_counts_idle_gaps(tmp_path):
    """A trace of two steps: overlapping kernels count once towards busy time, gaps count as idle."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    kernels = [("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 0, 600), ("flex_attention_backward", 500, 300),
               ("triton_per_fused_add_0", 1000, 200), ("qk_norm_rope_fwd_kernel", 1400, 200),
               ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32", 1800, 200)]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events[3]["args"] = {"correlation": 7}  # the qk kernel after the longest gap: launched late, inside an add
    events += [{"cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 1350, "dur": 5, "tid": 1,  # as Triton's
                "args": {"correlation": 7}},
               {"cat": "cpu_op", "name": "## Call CompiledFxGraph abc ##", "ts": 0, "dur": 5000, "tid": 1},
               {"cat": "cpu_op", "name": "aten::add_", "ts": 1300, "dur": 100, "tid": 1},
               {"cat": "cpu_op", "name": "aten::mul", "ts": 1300, "dur": 100, "tid": 2}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    text = throughput.kernel_summary(str(trace), steps=2)
    # busy: [0, 800) + [1000, 1200) + [1400, 1600) + [1800, 2000) = 1400 us of a 2000 us span, over 2 steps
    assert "GPU busy 0.7 ms of 1.0 ms per step (70.0%)" in text
    lines = text.splitlines()
    family_rows = lines[3:lines.index(next(line for line in lines if line.startswith("# idle gaps")))]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in family_rows}
    assert rows == {"bf16 matmul": 0.3, "flex attention": 0.1, "inductor": 0.1, "qk norm+rope": 0.1, "fp8 matmul": 0.1}
    assert "# idle gaps: 3, 0.6 ms in all; the longest:" in text
    gap_rows = [line for line in lines if line.startswith("| 200 |")]
    assert len(gap_rows) == 3
    late = next(r for r in gap_rows if "qk_norm_rope_fwd_kernel" in r)
    assert "| 150 | ## Call CompiledFxGraph abc ## > aten::add_ |" in late  # launched 150 us after the GPU went idle


def test_throughput_flags_a_diverged_run():
    """An absurd Adam learning rate makes the loss non-finite; the benchmark says its speed is of a diverged run."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny",
                          "--stage", "1", "--steps", "3", "--warmup", "1", "--set", "optim.adam_lr=1e30",
                          "--set", "optim.muon_lr=1e30"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the training loss is not finite" in out.stdout


def test_loss_probe_runs_each_variant_and_names_the_first_non_finite_step():
    """Seeded variants start from the same weights and batches: a warm-up changes nothing, the trainer's own loop
    logs the same losses, and an absurd learning rate shows as that variant's first non-finite step."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_probe.py"), "--preset", "tiny",
                          "--steps", "8", "--probe", "3", "--set", "optim.adam_every=2", "--set", "data.val_tokens=4096", "--variant", "eager",
                          "--variant", "eager+warmup", "--variant", "eager+run:run.val_every=4,run.warmup_steps=1",
                          "--variant", "eager:optim.adam_lr=1e30,optim.muon_lr=1e30"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.strip(" |").split(" | ") for line in out.stdout.splitlines() if line[:4] in {"| 0 ", "| 2 "}]
    assert len(rows) == 2
    for _, plain, warmed, run, absurd in rows:
        assert plain == warmed == run
    assert float(rows[1][1]) < float(rows[0][1])  # tiny's loss falls
    last = out.stdout.strip().splitlines()[-1]
    assert "eager: none" in last and "eager+warmup: none" in last and "optim.muon_lr=1e30: none" not in last


def test_kernel_builds_times_every_candidate_on_a_gpu_and_says_it_needs_one_elsewhere():
    """On a GPU: a row per candidate build of the three families; without one: exit 2 and a line that says so."""
    import torch

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_builds.py"), "--rows", "4096",
                          "--vocab", "8192"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if not torch.cuda.is_available():
        assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-2000:]
    families = {line.split("|")[1].strip() for line in out.stdout.splitlines()
                if line.startswith("| ") and "ms" not in line and "---" not in line}
    assert {"up", "down", "head K=1", "head K=2"} <= families, out.stdout


def test_kernel_micro_benchmarks_time_each_variant_on_a_gpu_and_say_they_need_one_elsewhere():
    """qk_prep.py (QK-norm + RoPE written four ways and the Triton kernel) and flex_configs.py (FlexAttention
    tile options): on a GPU a row per variant, each agreeing with the first; without one a clear exit."""
    import torch

    runs = {"qk_prep.py": ["--tokens", "4096", "--reps", "3"],
            "flex_configs.py": ["--tokens", "4096", "--windows", "256", "512", "--reps", "20"]}
    for script, args in runs.items():
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                             text=True, timeout=600, cwd=ROOT)
        if not torch.cuda.is_available():
            assert out.returncode != 0 and "run it on a machine with CUDA" in out.stderr, out.stderr
            continue
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.splitlines()
        if script == "qk_prep.py":
            fused = next(line.split() for line in lines if line.startswith("fused"))
            assert float(fused[6]) < 0.1 and float(fused[7]) < 0.5, out.stdout  # output and gradient agree
        else:
            defaults = next(line.split() for line in lines if line.startswith("defaults"))
            assert float(defaults[-1]) == 0.0, out.stdout


def test_startup_prints_each_warm_up_phase_as_it_ends_and_a_row_per_run():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--tiny", "--runs", "cold"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    phases = [line for line in out.stderr.splitlines() if line.startswith("# cold warm-up: ")]
    assert any("stage 1 " in p for p in phases) and phases[-1].startswith("# cold warm-up: final validation: ")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| cold |")]
    assert len(rows) == 1 and float(rows[0].split("|")[2]) > 0
