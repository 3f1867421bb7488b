"""The sweep's one-line progress: a diverged trial says where it diverged, and its step-0 loss (what the
searcher learns from it) never counts as the best so far."""

from types import SimpleNamespace

from sweeps.protocol import FINISHED
from sweeps.results import ProgressPrinter


def ended_trial(index: int, **result) -> SimpleNamespace:
    return SimpleNamespace(experiment_tag=f"{index + 1}_x", status="RUNNING", config={},
                           last_result={FINISHED: True, **result})


def test_a_diverged_trial_is_never_the_best_so_far():
    lines = []
    progress = ProgressPrinter(total_steps=40, metric="val_loss", out=lines.append, trials=3)
    diverged = ended_trial(0, status="diverged", val_loss=10.83, step=7, train_time_s=5.3)
    progress.on_trial_complete(0, [diverged], diverged)
    finished = ended_trial(1, status="finished", val_loss=10.84, step=40, train_time_s=30.4)
    progress.on_trial_complete(0, [diverged, finished], finished)

    assert "trial 0 diverged at step 7" in lines[0] and "no finished trial yet" in lines[0]
    assert "trial 1 finished: val_loss 10.8400" in lines[1] and "best so far 10.8400" in lines[1]
