"""A run's verdict: end-of-run times, tracks bound to the data and budget they were measured on (no Ray)."""

import hashlib

import numpy as np
import pytest

from speedrun.config import TrainConfig
from speedrun.data import val_fingerprint, write_shard
from speedrun.train import time_to_target
from sweeps.sweep_data import Fingerprints, measured, prepare_data
from sweeps.records import (CANDIDATE, DIVERGED, FAILED, MISSED, NOT_COMPARABLE, PRUNED, REACHED, Measured, Track,
                            choose_track, get_track, load_tracks, run_verdict)

TRACK = Track("t", "test", target_loss=3.28, record_time_s=79.685, source="test", data_source="fineweb",
              val_pattern="fineweb_val_*.bin", val_tokens=10_485_760, time_noise=0.183, record_runs=13)


def test_a_run_that_crosses_mid_run_but_ends_above_the_target_is_missed():
    # validations at 250-step spacing: the loss dips below 3.28 before the end (an interpolated crossing
    # would say ~79 s) but the run ends at 3.2805: a miss, whatever happened mid-run
    history = [(0, 10.8, 0.0), (1000, 3.31, 60.0), (1250, 3.279, 76.0), (1390, 3.2805, 79.0)]
    final_loss, end_time = history[-1][1], history[-1][2]
    assert time_to_target(final_loss, end_time, 3.28) is None
    assert run_verdict("finished", final_loss, end_time, TRACK) == MISSED


def test_a_run_that_ends_below_the_target_gets_its_end_time():
    assert time_to_target(3.2779, 79.0, 3.28) == 79.0
    assert run_verdict("finished", 3.2779, 79.0, TRACK) == CANDIDATE  # 0.685 s faster: beyond the 0.183 s noise
    assert run_verdict("finished", 3.2779, 79.6, TRACK) == REACHED  # inside the record's time noise
    assert run_verdict("finished", 3.2779, 85.0, TRACK) == REACHED


def test_how_a_run_ended_comes_first_and_incomparable_runs_get_no_record_word():
    assert run_verdict("diverged", None, 10.0, TRACK) == DIVERGED
    assert run_verdict("failed", None, None, TRACK) == FAILED
    assert run_verdict("pruned", 3.0, 1.0, TRACK) == PRUNED
    assert run_verdict("finished", 3.0, 1.0, TRACK, comparable=False) == NOT_COMPARABLE


def sample_run(steps: int = 100, val_tokens: int = 32768) -> Measured:
    tiny = get_track("tiny")
    return Measured("sample", "sample_val_*.bin", val_tokens, steps, tiny.val_sha256)


def test_the_default_track_is_the_one_that_matches_the_run():
    judge = choose_track(sample_run())
    assert judge.track.name == "tiny" and judge.comparable
    fineweb = choose_track(Measured("fineweb", "fineweb_val_*.bin", 10_485_760, 1390))
    assert fineweb.track.name == "track1" and fineweb.comparable  # track1 binds no step budget


def test_sample_data_is_never_comparable_with_track1():
    # the record model on the sample corpus (another corpus, another validation set): not track1's
    judge = choose_track(Measured("sample", "sample_val_*.bin", 196_608, 1285))
    assert judge.track.name != "track1" or not judge.comparable
    for name, track in load_tracks().items():
        if name == "track1":
            assert track.differences(Measured("sample", "sample_val_*.bin", 196_608, 1285))
    with pytest.raises(ValueError, match="--track track1 does not hold for this run.*data sample"):
        choose_track(Measured("sample", "sample_val_*.bin", 196_608, 1285), "track1")


def test_another_step_budget_or_other_validation_tokens_are_not_comparable():
    judge = choose_track(sample_run(steps=270))
    assert not judge.comparable and "270 steps (track tiny: 100)" in judge.describe()
    assert run_verdict("finished", 1.0, 1.0, judge.track, judge.comparable) == NOT_COMPARABLE
    changed = Measured("sample", "sample_val_*.bin", 32768, 100, hashlib.sha256(b"other").hexdigest())
    assert "sha256" in " ".join(choose_track(changed).differences)
    with pytest.raises(ValueError, match="270 steps"):
        choose_track(sample_run(steps=270), "tiny")


def test_the_tiny_track_fingerprint_is_the_sample_corpus_that_the_project_makes():
    cfg = TrainConfig.preset("tiny").with_total_steps(100)
    cfg = cfg.override(prepare_data(cfg, None))
    seen = measured(cfg, Fingerprints())
    assert choose_track(seen).track.name == "tiny" and choose_track(seen).comparable


def test_fingerprint_covers_exactly_the_first_val_tokens(tmp_path):
    tokens = np.arange(5000) % 50000
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens[:3000])
    write_shard(tmp_path / "fineweb_val_000001.bin", tokens[3000:])
    paths = sorted(tmp_path.glob("fineweb_val_*.bin"))
    expected = hashlib.sha256(tokens[:4000].astype("<u2").tobytes()).hexdigest()
    assert val_fingerprint(paths, 4000) == expected  # spans both shards
    assert val_fingerprint(paths, 3999) != expected


def test_given_fineweb_shards_run_the_tiny_model_on_them(tmp_path):
    """No GPU, no --preset, --data DIR: the tiny model reads the user's FineWeb-format shards (GPT-2 vocabulary
    and BOS), never the sample corpus, and trains on them."""
    from conftest import fast_tiny
    from speedrun.train import train

    rng = np.random.default_rng(0)
    for name, n in (("fineweb_train_000001.bin", 200_000), ("fineweb_val_000000.bin", 20_000)):
        tokens = np.where(rng.random(n) < 0.01, 50256, (np.arange(n) * 7) % 500)  # learnable, with BOS
        write_shard(tmp_path / name, tokens)
    cfg = fast_tiny(steps=16)
    overrides = prepare_data(cfg, str(tmp_path))
    assert overrides["data.data_dir"] == str(tmp_path) and overrides["data.source"] == "fineweb"
    cfg = cfg.override(overrides)
    assert cfg.model.vocab_size == 50257 and cfg.data.bos_id == 50256
    result = train(cfg)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] - 1.0  # it learned the shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]


def test_several_runs_get_record_only_from_a_passed_test_on_a_comparable_track():
    from sweeps.records import runs_verdict
    assert runs_verdict(True, 3.277, 3.28) == "record"
    assert runs_verdict(False, 3.279, 3.28) == "reached"  # mean below the target, but not significant or not faster
    assert runs_verdict(False, 3.281, 3.28) == "missed"
    assert runs_verdict(True, 3.277, 3.28, comparable=False) == "not comparable"
