"""Both reports typeset by Typst from --quick outputs: page limit, a section per question,
numbers in the PDF text that are the ones in the metrics, text that follows the outcome, and a
report step that only reads (no torch, no script imported as a library)."""
import ast
import json
import re
import shutil
from pathlib import Path

import pytest
from pypdf import PdfReader

from conftest import ROOT, run_script

SCRIPTS = ["sup_classification", "vae_amortized", "vae_latent_opt", "log_likelihood",
           "ppca_pca"]


def pdf_text(path: Path) -> str:
    """The PDF's text on one line: Typst's Unicode minus becomes '-', its typographic apostrophe
    "'", any whitespace one space."""
    text = " ".join(page.extract_text() for page in PdfReader(path).pages)
    text = text.replace("\u2212", "-").replace("\u2019", "'")
    return re.sub(r"\s+", " ", text)


def metrics(outputs, script):
    return json.loads((outputs / script / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reports(quick_outputs):
    report = quick_outputs / "report"
    return {"ex1": pdf_text(report / "ex1_report.pdf"),
            "lab": pdf_text(report / "apml_lab_report.pdf"),
            "ex1_pages": len(PdfReader(report / "ex1_report.pdf").pages),
            "lab_pages": len(PdfReader(report / "apml_lab_report.pdf").pages)}


def test_both_pdfs_and_their_editable_sources_are_written(quick_outputs, reports):
    report = quick_outputs / "report"
    for name in ("ex1_report.pdf", "apml_lab_report.pdf"):
        assert (report / name).read_bytes()[:5] == b"%PDF-"
    for name in ("ex1.typ", "apml_lab.typ", "ex1_values.json", "apml_lab_values.json"):
        assert (report / name).is_file(), name
    assert 1 <= reports["ex1_pages"] <= 5
    assert reports["lab_pages"] >= 2


def test_every_question_has_its_heading(reports):
    for heading in ("Part 1", "Q1: amortized VAE", "Q2: sampling from the prior",
                    "Q3: latent optimization", "Q4: the log-probability", "Eq. 7",
                    "Use of AI tools", "Did it overfit?", "Which method proposed better",
                    "Was the initialization sufficient", "(a) One training", "(b)", "(c)",
                    "Ablation"):
        assert heading in reports["ex1"], heading
    for q in ["3.1", "3.2", "3.3", "3.4", "3.5"] + [f"Q4.{i}:" for i in range(1, 11)]:
        assert q in reports["lab"], q


def test_numbers_in_the_text_are_the_metrics(reports, quick_outputs):
    text = reports["ex1"]
    c = metrics(quick_outputs, "sup_classification")
    ll = metrics(quick_outputs, "log_likelihood")
    lo = metrics(quick_outputs, "vae_latent_opt")
    assert f"Final accuracy: {100 * c['test_accuracy']:.2f} %" in text
    assert f"The most likely digit is {ll['most_likely_digit']} " in text
    assert f"training images {ll['train_mean']:,.1f} ± {ll['train_se']:.1f}" in text
    assert f"test images {ll['test_mean']:,.1f} ± {ll['test_se']:.1f}" in text
    assert f"± {ll['train_minus_test_se']:.1f}; paired by digit" in text   # Typst eats a bare ';' 
    assert f"lower by {ll['gap']['mean']:.1f} nats on average" in text
    assert f"reconstruction MSE {lo['final_train']['recon_mse']:.4f}" in text
    eq9_ess = ll["diagnostics"]["eq9"]["median_ess"]
    assert f"{eq9_ess:.1f} of {ll['num_samples']:,} (median" in text
    p = metrics(quick_outputs, "ppca_pca")
    text = reports["lab"]
    assert f"(sum over pixels, mean over images) is {p['pca']['test_sq_error']:.2f}" in text
    assert f"The VAE's average test squared error is {p['vae']['test_sq_error']:.2f}" in text
    assert f"stopped after {p['ppca_gradient']['iterations']:,} iterations" in text


def test_no_ascii_math_remains(reports):
    for name in ("ex1", "lab"):
        for ascii_math in ("sigma^2", "^T", "logsumexp_i", "sqrt(", "mu_i", "+-", "->"):
            assert ascii_math not in reports[name], (name, ascii_math)


def test_the_text_follows_a_different_outcome(quick_outputs, tmp_path):
    """Edit the metrics (another run's outcome): the answers that depend on them change."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "log_likelihood" / "metrics.json"
    ll = json.loads(path.read_text())
    ll["most_likely_digit"] = (ll["most_likely_digit"] + 3) % 10
    ll["train_vs_test"] = "train" if ll["train_vs_test"] != "train" else "neither"
    path.write_text(json.dumps(ll))
    path = copy / "vae_amortized" / "metrics.json"
    a = json.loads(path.read_text())
    a["overfit"]["verdict"] = "yes"
    path.write_text(json.dumps(a))
    run_script("report/build_report.py", "--outputs", copy)
    text = pdf_text(copy / "report" / "ex1_report.pdf")
    assert f"The most likely digit is {ll['most_likely_digit']} " in text
    assert ("More likely: the model has fitted" in text) == (ll["train_vs_test"] == "train")
    assert "Yes, it starts to overfit" in text


def test_report_reads_only(quick_outputs):
    """Nothing under report/ imports torch or a script; no script imports another script."""
    def imports(path):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    for path in (ROOT / "report").glob("*.py"):
        assert not imports(path) & {"torch", "torchvision", "utils", "model", *SCRIPTS}, path
    for script in SCRIPTS:
        assert not imports(ROOT / f"{script}.py") & set(SCRIPTS), script


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not json", "{}",
                                    "lacks a key"])
def test_a_bad_metrics_file_is_one_line_and_keeps_the_pdfs(quick_outputs, tmp_path, damage):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "vae_latent_opt" / "metrics.json"
    text = path.read_text()
    if damage == "missing":
        path.unlink()
    else:
        lacking = json.dumps({k: v for k, v in json.loads(text).items() if k != "same_budget"})
        path.write_text({"empty": "", "truncated": text[: len(text) // 2], "not json": "\x00\xff",
                         "{}": "{}", "lacks a key": lacking}[damage])
    before = {p.name: p.read_bytes() for p in (copy / "report").iterdir()}
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "vae_latent_opt" in proc.stderr and "run " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (copy / "report").iterdir()} == before


def test_an_edited_template_is_kept_and_used(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    template = copy / "report" / "ex1.typ"
    template.write_text(template.read_text().replace("Student name, CSE username",
                                                     "Ada Lovelace, ada01"))
    proc = run_script("report/build_report.py", "--outputs", copy)
    assert "kept your edited" in proc.stdout
    assert "Ada Lovelace, ada01" in pdf_text(copy / "report" / "ex1_report.pdf")
    assert "Ada Lovelace" in template.read_text()
