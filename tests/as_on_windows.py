"""Run a script with the POSIX-only modules hidden, as Windows has none of them:

    python tests/as_on_windows.py SCRIPT [ARGS...]

The tests build their quick chain through this wrapper, so every script and the report builder
are proved to start, lock their folder and finish without fcntl or resource.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import runpy
import sys
from pathlib import Path

for name in ("fcntl", "resource"):
    sys.modules[name] = None            # `import fcntl` now raises ImportError, as on Windows
script, *args = sys.argv[1:]
sys.argv = [script, *args]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
