"""The stage table, lr and momentum schedules against the record's numbers (modded-nanogpt record #89, speedrun/config.py)."""

import pytest

from speedrun import schedule as S
from speedrun.config import TrainConfig

REC = TrainConfig.preset("record")

# The record's stage table: (first step, last step, tokens/step, max seq len, short, long, MTP weights at start)
TABLE = [
    (0, 422, 131072, 896, 1, 3, (1, 0.5, 0.25)),
    (423, 846, 262144, 2048, 3, 7, (1, 0.5)),
    (847, 1269, 393216, 2048, 5, 11, (1,)),
    (1270, 1284, 393216, 2048, 6, 13, (1,)),
]


@pytest.mark.parametrize("first, last, tokens, seq, short, long, mtp", TABLE)
def test_stage_table_at_boundaries(first, last, tokens, seq, short, long, mtp):
    for step in (first, last):
        st = S.stage_at(REC.schedule, step)
        assert (st.tokens_per_step, st.max_seq_len, st.short_window, st.long_window) == (tokens, seq, short, long)
    assert S.mtp_weights(REC.schedule, first) == pytest.approx(mtp)


def test_mtp_annealing():
    assert S.mtp_weights(REC.schedule, 422) == pytest.approx((1, 0.5, 0.0))
    assert S.mtp_weights(REC.schedule, 846) == pytest.approx((1, 0.0))
    mid = S.mtp_weights(REC.schedule, 211)
    assert 0 < mid[2] < 0.25


def test_lr_schedule():
    s = REC.schedule
    assert S.lr_multiplier(s, 0) == 1.0 and S.lr_multiplier(s, 422) == 1.0
    assert S.lr_multiplier(s, 423) == pytest.approx(1.52)  # stage 2, before the cooldown starts at 508
    assert S.lr_multiplier(s, 507) == pytest.approx(1.52)
    assert S.lr_multiplier(s, 600) < 1.52
    assert S.lr_multiplier(s, 1269) == pytest.approx(1.73 * (1 + (0.15 - 1) * 761 / 762))
    assert S.lr_multiplier(s, 1270) == pytest.approx(0.15 * 0.15)  # extension: stage mult x final fraction
    assert S.lr_multiplier(s, 1284) == pytest.approx(0.15 * 0.15)


def test_momentum_schedule():
    o, s = REC.optim, REC.schedule
    assert S.muon_momentum(o, s, 0) == pytest.approx(0.85)
    assert S.muon_momentum(o, s, 150) == pytest.approx(0.90)
    assert S.muon_momentum(o, s, 300) == pytest.approx(0.95)
    assert S.muon_momentum(o, s, 1235) == pytest.approx(0.95)
    assert S.muon_momentum(o, s, 1285) == pytest.approx(0.85)
    assert 0.85 < S.muon_momentum(o, s, 1260) < 0.95
