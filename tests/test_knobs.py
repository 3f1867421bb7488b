"""Knobs of a contributor's train_gpt.py, resolved by parsing it: the stand-in under tests/trainers/ always, and
the public speedrun file (../shared/reference/public_train_gpt.py, or $SPEEDRUN_PUBLIC_TRAINER) where present."""

import ast
import os
from pathlib import Path

import pytest

from sweeps import run as sweep_cli
from sweeps.knobs import KnobError, diff, find_knobs, resolve, set_knobs

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "trainers" / "train_gpt.py"
PUBLIC = Path(os.environ.get("SPEEDRUN_PUBLIC_TRAINER", HERE.parent.parent / "shared" / "reference" /
                             "public_train_gpt.py"))
needs_public = pytest.mark.skipif(not PUBLIC.exists(), reason=f"the public trainer file is not at {PUBLIC}")


def line_of(source: str, text: str) -> int:
    (n,) = [i for i, line in enumerate(source.splitlines(), 1) if text in line]
    return n


@needs_public
def test_public_file_knobs_resolve_to_their_lines():
    source = PUBLIC.read_text()
    knobs = find_knobs(source)
    assert resolve(knobs, "Muon.lr").line == line_of(source, "optimizer2 = Muon(")
    assert resolve(knobs, "Muon.lr").value == "0.05"
    assert resolve(knobs, "DistAdam.lr").line == line_of(source, "optimizer1 = DistAdam(")
    assert resolve(knobs, "DistAdam.betas").value == "(0.8, 0.95)"
    cooldown = resolve(knobs, "Hyperparameters.cooldown_frac")
    assert cooldown.line == line_of(source, "cooldown_frac = ") and cooldown.value == "0.45"


@needs_public
def test_public_file_refuses_ambiguous_and_unknown_names_with_candidates():
    knobs = find_knobs(PUBLIC.read_text())
    with pytest.raises(KnobError, match=r"'compile.dynamic' is ambiguous .*2 places \(line \d+: False; line \d+: False\)"):
        resolve(knobs, "compile.dynamic")
    with pytest.raises(KnobError, match=r"no knob 'Muon.lrr' .*did you mean Muon.lr \(line \d+\)"):
        resolve(knobs, "Muon.lrr")


@needs_public
def test_public_file_patched_changes_only_the_knobs():
    source = PUBLIC.read_text()
    patched = set_knobs(source, {"Muon.lr": 0.03, "Hyperparameters.cooldown_frac": 0.5})
    changed = [line for line in diff(source, patched).splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 4
    assert "lr=0.03, momentum=0.95" in patched and "cooldown_frac = 0.5 #" in patched
    ast.parse(patched)


def test_standin_knobs_set_and_refused():
    source = STANDIN.read_text()
    knobs = {k.name: k for k in find_knobs(source)}
    assert knobs["KILL_AT_STEP"].kind == "assignment" and knobs["Hyperparameters.cooldown_frac"].kind == "field"
    assert knobs["Muon.lr"].kind == "keyword" and knobs["Muon.lr"].value == "0.05"
    patched = set_knobs(source, {"Muon.lr": 1e-3, "DistAdam.betas": (0.9, 0.99), "KILL_AT_STEP": 6})
    assert "Muon([model.proj.weight], lr=0.001, momentum=0.95" in patched
    assert "betas=(0.9, 0.99)" in patched and "KILL_AT_STEP = 6  # tests" in patched
    with pytest.raises(KnobError, match="list them with --list-knobs"):
        set_knobs(source, {"Nope.lr": 1})


def test_list_knobs_prints_the_file_knobs(capsys):
    assert sweep_cli.main(["--list-knobs", str(STANDIN)]) == 0
    out = capsys.readouterr().out
    assert "Muon.lr" in out and "Hyperparameters.num_iterations" in out and "int(os.environ.get" in out


def test_list_knobs_of_a_missing_file_is_one_error_line(capsys, tmp_path):
    assert sweep_cli.main(["--list-knobs", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "nope.py" in err


def refused(capsys, *argv) -> str:
    import ray
    rc = sweep_cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert not ray.is_initialized()
    return lines[0]


def space_file(tmp_path, params: str) -> str:
    path = tmp_path / "mine.toml"
    path.write_text('description = "t"\n' + params)
    return str(path)


@pytest.mark.parametrize("params, args, message", [
    ('[params."Muon.lrr"]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n', [], "did you mean Muon.lr"),
    ('[params."env.WARM"]\ntype = "int"\nlow = 1\nhigh = 9\n', [], "--env WARM=VALUE"),
    ('[params."Hyperparameters.num_iterations"]\ntype = "int"\nlow = 10\nhigh = 90\n', [], "not a literal"),
    ('[params."Muon.lr"]\ntype = "float"\nlow = 0.06\nhigh = 0.1\n', [], "lies outside"),
    ('[params."Muon.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n', ["--objective", "time"], "--objective time needs"),
    ('[params."Muon.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n', ["--set", "run.seed=1"], "--set applies to"),
    ('[params."Muon.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n', ["--env", "NOEQUALS"], "expected KEY=VALUE"),
    ('[params."Muon.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n', ["--trials", "0"], "at least 1 trial"),
])
def test_bad_script_sweeps_are_refused_before_ray_starts(capsys, tmp_path, params, args, message):
    line = refused(capsys, "--trainer", str(STANDIN), "--space", space_file(tmp_path, params), "--steps", "40",
                   "--storage", str(tmp_path), *args)
    assert message in line


def test_a_missing_trainer_file_is_refused(capsys, tmp_path):
    assert "no such file" in refused(capsys, "--trainer", str(tmp_path / "train_gpt.py"), "--space", "x.toml")


def test_a_script_worker_sees_its_own_gpu_as_cuda_local_rank():
    from sweeps.script_trial import visible_devices
    assert visible_devices("2,5", ["5"], 1) == "2,5"  # the trial's GPUs on this node, shared by Ray Train
    assert visible_devices("5,2", ["5"], 1) == "2,5"
    assert visible_devices("3,1,0,2", ["0"], 0) == "0,3,1,2"
    assert visible_devices("4", ["4"], 0) == "4"  # one GPU per trial
    assert visible_devices("", ["7"], 0) == "7"  # not shared: only its own


@pytest.mark.parametrize("complete", [True, False])
def test_a_script_that_aborts_after_its_final_validation_keeps_its_result(tmp_path, complete):
    """A real process that exits with SIGABRT (a teardown crash, as gloo's at exit): before its final validation
    the trial fails with the stderr tail; after it, the result stands and the exit code is reported."""
    import subprocess
    import sys

    from sweeps.script_trial import ScriptFailed, check_end

    stderr = tmp_path / "stderr.rank0.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", "import os, sys; print('terminate called', file=sys.stderr, "
                                 "flush=True); os.abort()"], stderr=err)
        code = proc.wait()
    assert code < 0
    batch = {"end": "eof", "exit": code, "reports": []}
    if complete:
        note = check_end(batch, 0, proc, "train_gpt.py", stderr, 15.0, complete=True)
        assert note.code == code and "after its final validation line" in note.message
    else:
        with pytest.raises(ScriptFailed, match="exited with .* on rank 0; last stderr lines of rank 0:\n.*terminate called"):
            check_end(batch, 0, proc, "train_gpt.py", stderr, 15.0, complete=False)
    clean = subprocess.Popen([sys.executable, "-c", "pass"])
    clean.wait()
    assert check_end({"end": "eof", "exit": 0, "reports": []}, 0, clean, "train_gpt.py", stderr, 15.0) is None
