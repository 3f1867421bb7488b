"""TrainConfig: the record's facts, overrides, validation messages, round-trips."""

import pytest

from speedrun.config import TrainConfig


def test_record_preset_matches_design():
    c = TrainConfig.preset("record")
    m, o, s, d = c.model, c.optim, c.schedule, c.data
    assert (m.n_layer, m.n_head, m.head_dim, m.dim, m.mlp_dim) == (11, 6, 128, 768, 3072)
    assert (m.vocab_size, m.padded_vocab_size) == (50257, 50304)
    assert m.no_attn_layers == (6,) and m.long_window_layers == (3, 10)
    assert m.value_embed_layers == (1, 2, 8, 9, 10) and m.paired_head_layers == (0, 2, 5, 9)
    assert (m.softcap_scale, m.softcap_shift, m.softcap_div) == (23.0, 5.0, 7.5)
    assert m.untie_step == 847
    assert (o.muon_lr, o.muon_momentum, o.muon_momentum_min, o.muon_beta2, o.muon_wd) == (0.023, 0.95, 0.85, 0.9, 1.2)
    # DESIGN's "MLP out-projection x2" multiplies the shape factor of the record's (3072, 768) storage, 2; this
    # model stores the out-projection (768, 3072), shape factor 1, so the same step is a multiplier of 4
    assert (o.muon_momentum_warmup_steps, o.muon_momentum_cooldown_steps, o.muon_mlp_out_lr_mult) == (300, 50, 4.0)
    assert (o.adam_lr, o.adam_eps, o.adam_wd, o.adam_every) == (0.008, 1e-10, 0.005, 2)
    assert o.embed_betas == (0.5, 0.95) and o.embed_wd_mult == 150
    assert o.value_embed_betas == (0.75, 0.95) and (o.value_embed_lr_mult, o.value_embed_wd_mult) == (75, 5)
    assert o.scalar_betas == (0.9, 0.99) and (o.scalar_lr_mult, o.scalar_wd_mult) == (5, 0)
    assert (s.num_scheduled_steps, s.extension_steps, s.cooldown_frac, s.final_lr_frac) == (1270, 15, 0.6, 0.15)
    assert s.total_steps == 1285 and s.stage_starts == (0, 423, 847)
    assert s.tokens_per_step == (131072, 262144, 393216, 393216)
    assert s.max_seq_lens == (896, 2048, 2048, 2048)
    assert s.short_windows == (1, 3, 5, 6) and s.long_windows == (3, 7, 11, 13)
    assert s.stage_lr_mults == (1.0, 1.52, 1.73, 0.15) and s.final_long_window == 20
    assert d.val_tokens == 10_485_760 and d.bos_id == 50256
    assert c.run.target_loss == 3.28 and c.run.val_every == 250


def test_override_returns_new_validated_config():
    c = TrainConfig.preset("record")
    c2 = c.override({"optim.muon_lr": "0.03", "schedule.long_windows.2": 12, "model.use_smear_gate": "false"})
    assert c2.optim.muon_lr == 0.03 and c2.schedule.long_windows == (3, 7, 12, 13)
    assert c2.model.use_smear_gate is False
    assert c.optim.muon_lr == 0.023  # the original is untouched


@pytest.mark.parametrize("updates, words", [
    ({"optim.muon_lrr": 0.1}, ["optim.muon_lrr", "optim.muon_lr"]),
    ({"nosuch.x": 1}, ["nosuch.x"]),
    ({"optim.muon_lr": -1}, ["optim.muon_lr", "> 0"]),
    ({"optim.muon_lr": "fast"}, ["optim.muon_lr", "fast"]),
    ({"model.n_layer": 2.5}, ["model.n_layer"]),
    ({"schedule.long_windows.2": 30}, ["schedule.long_windows", "max_seq_len"]),
    ({"schedule.long_windows.9": 3}, ["schedule.long_windows.9", "out of range"]),
    ({"schedule.short_windows.0": 5}, ["schedule.short_windows"]),
    ({"model.dim": 512}, ["model.dim", "n_head*head_dim"]),
    ({"schedule.stage_starts": [0, 900, 800]}, ["schedule.stage_starts"]),
    ({"optim.embed_betas": [0.5]}, ["optim.embed_betas"]),
    ({"model.long_window_layers": [3, 11]}, ["model.long_window_layers"]),
])
def test_bad_values_name_the_key(updates, words):
    with pytest.raises(ValueError) as e:
        TrainConfig.preset("record").override(updates)
    for w in words:
        assert w in str(e.value)


def test_flat_dict_round_trip():
    for name in ("record", "tiny"):
        c = TrainConfig.preset(name)
        flat = c.to_dict()
        assert all(k.count(".") == 1 for k in flat)
        assert flat["optim.muon_lr"] == c.optim.muon_lr
        assert TrainConfig.from_dict(flat) == c


def test_unknown_preset():
    with pytest.raises(ValueError, match="record"):
        TrainConfig.preset("huge")


def test_with_total_steps_scales_the_schedule():
    c = TrainConfig.preset("record").with_total_steps(257)
    s = c.schedule
    assert s.total_steps == 257 and s.num_stages == 4
    assert s.stage_starts[0] == 0 and s.stage_starts[1] == round(423 * 257 / 1285)
    assert c.model.untie_step == s.stage_starts[2]  # untying still coincides with stage 3
    with pytest.raises(ValueError, match="too short"):
        TrainConfig.preset("record").with_total_steps(3)


def test_one_resolution_order_for_steps_and_sets(tmp_path):
    """--steps 100 --set optim.muon_momentum_warmup_steps=50 on the tiny preset: the run gets 50 whether it is
    started by `python -m speedrun`, as a sweep trial or by record.py (the --set value is never rescaled)."""
    from speedrun.__main__ import build_config
    from sweeps import record as record_cli
    from sweeps.plan import plan_sweep
    from sweeps.settings import parse_settings

    key, sets = "optim.muon_momentum_warmup_steps", ["--set", "optim.muon_momentum_warmup_steps=50"]
    assert TrainConfig.resolve("tiny", {key: 50}, 100).optim.muon_momentum_warmup_steps == 50
    assert TrainConfig.resolve("tiny", None, 100).optim.muon_momentum_warmup_steps == 19  # the preset's 50, scaled
    assert build_config("tiny", [f"{key}=50"], None, 100).optim.muon_momentum_warmup_steps == 50
    sweep = plan_sweep(parse_settings(["--space", "muon_lr", "--preset", "tiny", "--steps", "100", *sets,
                                       "--storage", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]))
    trial = sweep.spec.config_for({"optim.muon_lr": 0.03, "optim.muon_wd": 0.5})
    assert trial.optim.muon_momentum_warmup_steps == 50 and trial.schedule.total_steps == 100
    args = record_cli.parse_args(["--preset", "tiny", "--steps", "100", *sets])
    cfg, _ = record_cli.candidate_config(args, f"sqlite:///{tmp_path}/m.db")
    assert cfg.optim.muon_momentum_warmup_steps == 50
