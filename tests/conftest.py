# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import json
import os
import shlex
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

# tqdm reads TQDM_DISABLE when it is imported: set it before anything imports it.
os.environ["TQDM_DISABLE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
collect_ignore_glob = ["benchmark_*.py"]


# One thread: two runs of a script (a whole one, and one killed and resumed) must give the same
# metrics bit for bit. With several threads a kernel's parallel reductions may round differently
# from one process to the next (seen once in CI: a 1e-4 relative difference after 3 epochs, in
# the first epoch already), which is no fault of the resuming. The quick chain runs so too: its
# folders are the whole runs that the resume tests compare with.
SAME_BITS = {"TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def run_script(script, *args, env_extra=None, check=True):
    """Run one of the repository's scripts as a user would, from the repository root."""
    env = dict(os.environ, **SAME_BITS)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_inprocess(script, args, capsys):
    """(exit code, stderr) of `python script args`, run in this process: no interpreter to
    start and no torch to import (several seconds a run), for runs that need no process of
    their own (a kill, or bit-for-bit comparisons, do)."""
    path = ROOT / script
    with mock.patch.object(sys, "argv", [str(path), *map(str, args)]):
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, capsys.readouterr().err


def run_injected(fault, when, script, *args):
    """A script run with a fault injected from outside (tests/inject.py): `kill`, `INT` or
    `TERM`, `-after-epoch` or `-during-save`, at the `when`-th time."""
    return run_script("tests/inject.py", fault, when, script, *args, check=False)


def metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


def chain_args(quick_outputs, folder):
    """The flags the quick chain ran `folder`'s script with (utils.EXPERIMENTS, as the Makefile
    runs them), but --out: the same command into another folder gives the same metrics."""
    import utils

    _, *flags = utils.EXPERIMENTS[folder]
    return ["--quick", "--device", "cpu", *(f.format(out=quick_outputs) for f in flags)]


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
    report tests. The first three experiments (Part 1, Q1, Q3) are the uninterrupted runs that
    the resume tests compare with (`chain_args` gives their flags): they run on one thread, as
    `run_script` does; the rest of the chain keeps torch's threads (about 30 s less)."""
    out = tmp_path_factory.mktemp("outputs")
    python = shlex.join([sys.executable, str(ROOT / "tests" / "as_on_windows.py")])  # a path
    # with a space in it (the repository cloned into "My Documents") stays one word
    make = ["make", "-C", str(ROOT), f"OUT={out}", "FLAGS=--quick", "DEVICE=cpu", f"PY={python}",
            "VENV_DEP="]
    for target, env in ((f"{out}/vae_latent_opt/metrics.json", SAME_BITS),
                         ("all", {"TQDM_DISABLE": "1"})):
        proc = subprocess.run([*make, target], env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
