"""Run a script with a fault injected from outside, for the interruption tests:

    python tests/inject.py FAULT N SCRIPT [ARGS...]

FAULT is what happens to the process: `kill` (like SIGKILL: no cleanup, exit 137), `INT` (Ctrl-C)
or `TERM` (SIGTERM), followed by when: `-after-epoch` (right after the N-th epoch's checkpoint is
saved) or `-during-save` (while the N-th checkpoint_last.pt is half written: torch.save has
returned, the temporary file is not yet renamed). The script runs through runpy exactly as
`python SCRIPT ARGS` would; nothing in the production code knows about this file.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import utils  # noqa: E402

fault, when, script, *args = sys.argv[1:]
how, _, moment = fault.partition("-")
# A process started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, and
# Python then installs no Ctrl-C handler: restore the one a terminal's Python has, so that `INT`
# here is the user's Ctrl-C however the test suite was launched.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
count = 0


def strike():
    if how == "kill":
        os._exit(137)
    os.kill(os.getpid(), getattr(signal, f"SIG{how}"))


def nth_time() -> bool:
    global count
    count += 1
    return count == int(when)


if moment == "after-epoch":
    real_save = utils.Training.save

    def save_then_strike(self, epoch):
        real_save(self, epoch)
        if nth_time():
            strike()

    utils.Training.save = save_then_strike
elif moment == "during-save":
    real_torch_save = torch.save

    def torch_save_then_strike(obj, f, *a, **k):
        real_torch_save(obj, f, *a, **k)
        if ".checkpoint_last." in os.path.basename(getattr(f, "name", str(f))) and nth_time():
            strike()

    torch.save = torch_save_then_strike
else:
    sys.exit(f"unknown fault {fault!r}")
sys.argv = [str(ROOT / script), *args]
runpy.run_path(str(ROOT / script), run_name="__main__")
