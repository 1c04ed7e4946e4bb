# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

# tqdm reads TQDM_DISABLE when it is imported: set it before anything imports it.
os.environ["TQDM_DISABLE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
collect_ignore_glob = ["benchmark_*.py"]


def run_script(script, *args, env_extra=None, check=True):
    """Run one of the repository's scripts as a user would, from the repository root."""
    # One thread: two runs of a script (a whole one, and one killed and resumed) must give the
    # same metrics bit for bit. With several threads a kernel's parallel reductions may round
    # differently from one process to the next (seen once in CI: a 1e-4 relative difference
    # after 3 epochs, in the first epoch already), which is no fault of the resuming.
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_injected(fault, when, script, *args):
    """A script run with a fault injected from outside (tests/inject.py): `kill`, `INT` or
    `TERM`, `-after-epoch` or `-during-save`, at the `when`-th time."""
    return run_script("tests/inject.py", fault, when, script, *args, check=False)


def metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


NONDETERMINISTIC = {"train_seconds", "epoch_seconds", "seconds", "estimate_seconds", "wall_seconds",
                    "resumed_epochs", "peak_rss_mb", "args"}


def comparable(folder):
    """A metrics.json without what differs between identical runs (timings, memory, paths)."""
    return {k: v for k, v in metrics(folder).items() if k not in NONDETERMINISTIC}


@pytest.fixture(scope="session")
def quick_outputs(tmp_path_factory):
    """Every script with --quick into <outputs>/<script>/ and both reports, built the way
    `make quick` builds them (the Makefile's chain, with this interpreter), and with the
    POSIX-only modules hidden as on Windows (tests/as_on_windows.py); shared by the script and
    report tests."""
    out = tmp_path_factory.mktemp("outputs")
    python = shlex.join([sys.executable, str(ROOT / "tests" / "as_on_windows.py")])  # a path
    # with a space in it (the repository cloned into "My Documents") stays one word
    proc = subprocess.run(["make", "-C", str(ROOT), "all", f"OUT={out}", "FLAGS=--quick",
                           "DEVICE=cpu", f"PY={python}", "VENV_DEP="],
                          env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
