"""A Tune scheduler's decisions kept in the sweep folder, so that a resumed sweep continues them.

Tune checkpoints its trials and its searcher, not its scheduler: a restored sweep would start ASHA with empty
rungs and the record-curve pruner without its reference curve, and stop different trials than the sweep
would have stopped uninterrupted. `PersistentState`, mixed in before a scheduler class, writes the
scheduler's state after every event (a small pickle, replaced atomically) and reads it back at the first
event after a restore. Trial ids are the keys of that state, and Tune keeps them across a restore.
"""

from __future__ import annotations

import os
import pickle

_OWN = ("state_path", "_recovered")


class PersistentState:
    state_path: str = ""  # absolute path of the state file; empty: in memory only
    _recovered: bool = False

    def recover(self) -> None:
        if self._recovered:
            return
        self._recovered = True
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path, "rb") as f:
                self.__dict__.update(pickle.load(f))

    def persist(self) -> None:
        if not self.state_path:
            return
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump({k: v for k, v in self.__dict__.items() if k not in _OWN}, f)
        os.replace(tmp, self.state_path)

    def on_trial_add(self, tune_controller, trial):
        self.recover()
        super().on_trial_add(tune_controller, trial)
        self.persist()

    def on_trial_result(self, tune_controller, trial, result):
        self.recover()
        action = super().on_trial_result(tune_controller, trial, result)
        self.persist()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self.recover()
        super().on_trial_complete(tune_controller, trial, result)
        self.persist()

    def on_trial_error(self, tune_controller, trial):
        self.recover()
        super().on_trial_error(tune_controller, trial)
        self.persist()

    def on_trial_remove(self, tune_controller, trial):
        self.recover()
        super().on_trial_remove(tune_controller, trial)
        self.persist()
