"""A subprocess that runs merges and stops at chosen points, so a test can signal it there.

    python interrupt_harness.py fwllm CONTROL_DIR      # the cases in CONTROL_DIR/cases.json
    python interrupt_harness.py mergekit CONTROL_DIR RECIPE OUT_DIR   # mergekit-yaml, stopping in the solve

Each fwllm case runs `fwllm merge ARGV` in this one process (one import for all cases). At
its pause point ("solve": FW starts; "write": mergekit has written a shard; "rename": the
replace has moved the old OUT_DIR aside) the harness writes CONTROL/ready-<i> and waits for
CONTROL/go-<i>, sleeping in short steps so a signal lands in Python code. It then writes
CONTROL/result-<i>.json and waits for CONTROL/next-<i>, while the test looks at the folders.
"""

import json
import os
import signal
import sys
import threading
import time

# Ctrl-C as a terminal delivers it, even when the test run was started in the background (a
# background job inherits SIGINT ignored, and Python then keeps it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for(path, seconds=600):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"harness: gave up waiting for {path}")
        time.sleep(0.05)


class Pause:
    """Stops once, at the first arrival, in the main thread."""

    def __init__(self, control, index):
        self.control, self.index, self.done = control, index, False

    def __call__(self):
        if self.done or threading.current_thread() is not threading.main_thread():
            return
        self.done = True
        with open(os.path.join(self.control, f"ready-{self.index}"), "w") as fp:
            fp.write(str(os.getpid()))
        wait_for(os.path.join(self.control, f"go-{self.index}"))


def install(point, pause, out_dir=None):
    """Patch the pause in at `point`; returns an undo function."""
    if point == "solve":
        from fwllm.solvers.frank_wolfe import FrankWolfe

        owner, name = FrankWolfe, "run"
        original = FrankWolfe.run

        def patched(self, *a, **k):
            pause()
            return original(self, *a, **k)
    elif point == "write":
        from fwllm.mergekit_glue.streaming_writer import StreamingTensorWriter

        owner, name = StreamingTensorWriter, "_flush_current_shard"
        original = StreamingTensorWriter._flush_current_shard

        def patched(self, *a, **k):
            out = original(self, *a, **k)
            pause()  # a shard is on disk, the rest of the output is not
            return out
    elif point == "rename":
        owner, name = os, "rename"
        original = os.rename
        target = os.path.abspath(out_dir)

        def patched(src, dst, *a, **k):
            if os.path.abspath(os.fspath(dst)) == target:
                pause()  # the previous OUT_DIR has been moved aside; the new one is not in place
            return original(src, dst, *a, **k)
    else:
        return lambda: None
    setattr(owner, name, patched)
    return lambda: setattr(owner, name, original)


def run_fwllm_cases(control):
    from click.testing import CliRunner

    from fwllm.cli import main

    with open(os.path.join(control, "cases.json")) as fp:
        cases = json.load(fp)
    for i, case in enumerate(cases):
        undo = install(case.get("pause"), Pause(control, i), case.get("out"))
        try:
            result = CliRunner().invoke(main, case["argv"])
        finally:
            undo()
        with open(os.path.join(control, f"result-{i}.json.tmp"), "w") as fp:
            json.dump({"exit_code": result.exit_code, "output": result.output}, fp)
        os.replace(os.path.join(control, f"result-{i}.json.tmp"), os.path.join(control, f"result-{i}.json"))
        wait_for(os.path.join(control, f"next-{i}"))


def run_mergekit(control, recipe, out):
    from mergekit.scripts.run_yaml import main

    install("solve", Pause(control, 0))
    main([recipe, out], standalone_mode=True)


if __name__ == "__main__":
    if sys.argv[1] == "fwllm":
        run_fwllm_cases(sys.argv[2])
    else:
        run_mergekit(*sys.argv[2:5])
