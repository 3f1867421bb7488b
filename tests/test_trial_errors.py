"""A worker's error reaches the trial's error.txt whole, even when the exception object cannot be pickled."""

import pickle
import threading

from sweeps.trial import portable_error


class HoldsALock(Exception):
    """Like torch's compiler errors that hold pybind11 objects: not picklable."""

    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()


def raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


def test_unpicklable_error_becomes_a_runtime_error_with_its_cause():
    error = raised(HoldsALock("convert FlexibleLayout to FixedLayout first"))
    try:
        pickle.dumps(error)
        raise AssertionError("the injected error should not pickle")
    except TypeError:
        pass
    out = portable_error(error)
    assert isinstance(out, RuntimeError)
    text = str(pickle.loads(pickle.dumps(out)))
    assert text.startswith("HoldsALock: convert FlexibleLayout to FixedLayout first")
    assert "test_trial_errors.py" in text  # the traceback travels too


def test_picklable_error_is_kept_as_it_is():
    error = raised(ValueError("data.val_tokens too large"))
    assert portable_error(error) is error
