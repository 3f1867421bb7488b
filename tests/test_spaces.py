"""Search spaces: every shipped space is valid for both presets; bad spaces are refused with a clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.spaces import SpaceError, available_spaces, load_space, parse_space

SHIPPED = ["muon_lr", "adam_lr", "softcap", "windows", "schedule"]


def test_required_spaces_ship():
    assert set(SHIPPED) <= set(available_spaces())


@pytest.mark.parametrize("preset", ["record", "tiny"])
@pytest.mark.parametrize("name", SHIPPED)
def test_space_loads_and_control_is_the_preset(name, preset):
    space = load_space(name, preset)
    control = space.control_point()
    base = space.base_config().to_dict()
    for p in space.params:
        assert p.contains(control[p.key])
    cfg = space.trial_config(control, steps=0)
    flat = cfg.to_dict()
    assert flat == base  # trial 0 is exactly the preset (plus the space's fixed overrides)
    assert space.trial_config(control).schedule.total_steps == (space.steps or cfg.schedule.total_steps)


def raw(**params):
    return {"description": "t", "params": params}


@pytest.mark.parametrize("space, words", [
    (raw(**{"optim.muon_lrr": {"type": "float", "low": 0.01, "high": 0.03}}), ["optim.muon_lrr", "unknown config key"]),
    (raw(**{"optim.muon_lr": {"type": "float", "low": 0.05, "high": 0.01}}), ["low=0.05 > high=0.01"]),
    (raw(**{"optim.muon_lr": {"type": "float", "low": -1.0, "high": 0.03}}), ["optim.muon_lr", "> 0"]),
    (raw(**{"optim.muon_lr": {"type": "float", "low": 0.03, "high": 0.05}}), ["outside", "control"]),
    (raw(**{"optim.muon_lr": {"type": "gaussian", "low": 0.01, "high": 0.05}}), ["type='gaussian'"]),
    (raw(**{"schedule.long_windows.2": {"type": "int", "low": 8, "high": 40}}), ["long_windows", "max_seq_len"]),
    (raw(**{"optim.muon_lr": {"type": "float", "low": 0.0, "high": 0.05, "log": True}}), ["log=true needs low > 0"]),
    ({"description": "t"}, ["at least one parameter"]),
    ({**raw(**{"schedule.long_windows.2": {"type": "int", "low": 8, "high": 14}}), "compile_cost": "none"},
     ["compile_cost = 'none'", "schedule.long_windows.2 change compiled graphs", "'recompiles'"]),
    ({**raw(**{"optim.muon_lr": {"type": "float", "low": 0.01, "high": 0.05}}), "compile_cost": "recompiles"},
     ["as a tensor", "compile_cost = 'none'"]),
])
def test_bad_spaces_are_refused(space, words):
    with pytest.raises(SpaceError) as e:
        parse_space(space, "bad", "record")
    for w in words:
        assert w in str(e.value)


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(SpaceError) as e:
        load_space("muon", "tiny")
    assert "muon_lr" in str(e.value) and "windows" in str(e.value)


def test_list_spaces_cli():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "sweeps" / "run.py"), "--list-spaces"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for name in SHIPPED:
        assert name in out.stdout
    assert "NorMuon learning rate" in out.stdout


def test_unknown_space_cli_exits_2():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "sweeps" / "run.py"), "--space", "nope"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "known spaces are" in errors[0]


def test_trial_that_cannot_fit_is_refused_before_ray():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "sweeps" / "run.py"), "--space", "muon_lr", "--preset", "tiny",
                          "--cpus-per-worker", str(10_000)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--cpus-per-worker" in errors[0]


def test_points_that_compile_the_same_graphs_run_next_to_each_other():
    space = parse_space({**raw(**{"schedule.long_windows.2": {"type": "int", "low": 8, "high": 14},
                                  "optim.muon_lr": {"type": "float", "low": 0.01, "high": 0.05}}),
                         "points": [{"schedule.long_windows.2": 9, "optim.muon_lr": 0.02},
                                    {"schedule.long_windows.2": 11, "optim.muon_lr": 0.04},
                                    {"schedule.long_windows.2": 9, "optim.muon_lr": 0.03},
                                    {"schedule.long_windows.2": 11, "optim.muon_lr": 0.01}]}, "w", "record")
    assert space.compile_cost == "recompiles"
    order = [(p["schedule.long_windows.2"], p["optim.muon_lr"]) for p in space.points_by_graphs()]
    # the control (window 11) first, then the other window-11 points, then the window-9 ones; stable within
    assert order == [(11, 0.023), (11, 0.04), (11, 0.01), (9, 0.02), (9, 0.03)]


SMALL_STEPS = {"data.max_micro_batch_tokens": 512, **{f"schedule.tokens_per_step.{i}": 512 for i in range(4)}}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_space_trains_at_its_corners(name):
    """Each shipped space's lowest and highest points (a categorical's first and last choice) make a tiny config
    that trains: the loss falls over 12 steps. A real Ray sweep of one space runs in tests/test_sweep.py."""
    from speedrun.train import train

    space = load_space(name, "tiny")
    for corner in (0, -1):
        params = {p.key: p.choices[corner] if p.type == "categorical" else (p.low, p.high)[corner]
                  for p in space.params}
        cfg = space.trial_config(params, 12).override({**SMALL_STEPS, "run.warmup_steps": 0, "data.val_tokens": 4096,
                                                       "run.val_every": 12})
        result = train(cfg)
        assert result.status == "finished" and result.steps == 12, params
        assert result.val_loss < result.history[0]["val_loss"] - 0.3, params
