"""One exception type for problems caused by the user's input.

The CLI turns a `FwllmError` into a single `error: ...` line and a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class FwllmError(Exception):
    """Bad input (recipe, model, calibration data, ...) explained in one line."""
