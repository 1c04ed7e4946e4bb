"""Both reports typeset by Typst from --quick outputs: page limit, a section per question,
numbers in the PDF text that are the ones in the metrics, text that follows the outcome, and a
report step that only reads (no torch, no script imported as a library)."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import ast
import math
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from pypdf import PdfReader

from conftest import ROOT, run_script
from report import build_report  # its number formats
import log_likelihood  # its agreement(), to edit the metrics as another run would write them

SCRIPTS = ["sup_classification", "vae_amortized", "vae_latent_opt", "log_likelihood",
           "ppca_pca"]


def assert_refused_keeping_the_pdfs(outputs: Path, says: str) -> None:
    """The report builder refuses `outputs` in one line saying `says` (exit 2, no traceback),
    and both PDFs there stay byte for byte as they were."""
    before = {p.name: p.read_bytes() for p in (outputs / "report").glob("*.pdf")}
    proc = run_script("report/build_report.py", "--outputs", outputs, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (outputs / "report").glob("*.pdf")} == before


def build(outputs: Path) -> None:
    """Typeset both reports from `outputs` in this process: the builder as `make report` runs
    it, without a new interpreter's start each time (the tests that check its exit code and
    messages run it as a script)."""
    build_report.main(["--outputs", str(outputs)])


def edited_copy(quick_outputs: Path, tmp_path: Path, folder: str, edit) -> Path:
    """A copy of the quick outputs whose <folder>/metrics.json `edit(metrics)` changed in place,
    as another run would have written it."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / folder / "metrics.json"
    metrics = json.loads(path.read_text())
    edit(metrics)
    path.write_text(json.dumps(metrics))
    return copy


def pdf_text(path: Path) -> str:
    """The PDF's text on one line: Typst's Unicode minus becomes '-', its typographic apostrophe
    "'", any whitespace one space; older pypdf (5.1) puts a space after a '(' that opens a
    link ("( Table 2)"), which goes. Each page's footer ("2 / 5") goes too: pypdf can place it in
    the middle of a sentence that runs on to the next page."""
    pages = PdfReader(path).pages
    text = " ".join(page.extract_text().replace(f"{i} / {len(pages)}", " ", 1)
                    for i, page in enumerate(pages, 1))
    text = text.replace("\u2212", "-").replace("\u2019", "'")
    return re.sub(r"\(\s+", "(", re.sub(r"\s+", " ", text))


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
                    "Was the initialization sufficient", "(a)", "(b)", "(c)",
                    "Ablation", "Additional findings", "Answer."):
        assert heading in reports["ex1"], heading
    for q in ["3.1", "3.2", "3.3", "3.4", "3.5"] + [f"Q4.{i}:" for i in range(1, 11)]:
        assert q in reports["lab"], q


def to_its_se(mean: float, se: float) -> str:
    """'mean ± se' with the standard error to one significant figure (two when the first is a
    1), and the mean to match: the usual rule, written out independently."""
    first = f"{se:e}"                                   # '9.300000e-01'
    figures = 2 if first[0] == "1" else 1
    decimals = max(0, figures - 1 - int(first.split("e")[1]))
    return f"{mean:,.{decimals}f} ± {se:.{decimals}f}"


@pytest.mark.parametrize("mean, se, expected", [(-296.02, 14.9, "-296 ± 15"),
                                                (-3.456, 0.93, "-3.5 ± 0.9"),
                                                (12.34, 1.5, "12.3 ± 1.5"),
                                                (0.131312, 0.00078, "0.1313 ± 0.0008"),
                                                (30.291, 0.18, "30.29 ± 0.18"),
                                                (0.35704, 0.0086, "0.357 ± 0.009"),
                                                (-185.7, 2.04, "-186 ± 2"),
                                                (7.0, 25.0, "7 ± 25"),
                                                (1.23456, 0.0199, "1.235 ± 0.020")])
def test_a_mean_shows_the_digits_its_standard_error_supports(mean, se, expected):
    assert to_its_se(mean, se) == expected
    decimals = build_report.se_decimals(se)
    assert f"{build_report.num(mean, decimals)} ± {build_report.num(se, decimals)}".replace(
        build_report.MINUS, "-") == expected


@pytest.mark.parametrize("x, digits, expected", [(0.04, 1, "0.0"), (-0.04, 1, "0.0"),
                                                 (0.05001, 1, "+0.1"), (-0.3, 0, "0"),
                                                 (-1.2, 1, "-1.2"), (0.0, 2, "0.00")])
def test_a_signed_number_that_rounds_to_zero_has_no_sign(x, digits, expected):
    assert build_report.num(x, digits, sign=True).replace(build_report.MINUS, "-") == expected


@pytest.mark.parametrize("x, expected", [(0.00153, "+0.0015"), (-0.0126, "-0.013"),
                                         (0.25, "+0.25")])
def test_a_small_difference_shows_two_significant_figures(x, expected):
    assert build_report.small(x).replace(build_report.MINUS, "-") == expected


def test_numbers_in_the_text_are_the_metrics(reports, quick_outputs):
    text = reports["ex1"]
    c = metrics(quick_outputs, "sup_classification")
    ll = metrics(quick_outputs, "log_likelihood")
    lo = metrics(quick_outputs, "vae_latent_opt")
    acc = c["test_accuracy"]
    acc_se = math.sqrt(acc * (1 - acc) / c["val_images"])    # binomial, over the test images
    assert f"Final accuracy: {to_its_se(100 * acc, 100 * acc_se)} % (± one binomial standard" in text
    a = metrics(quick_outputs, "vae_amortized")              # Q1 on equal digit shares
    for split in ("train", "val"):
        e = a["final_equal_digits"][split]
        assert to_its_se(e["recon_mse"], e["recon_mse_se"]) in text, split
    assert f"its plain mean is {a['final_val']['recon_mse']:.4f}" in text
    assert f"the most likely digit is {ll['most_likely_digit']} " in text
    assert f"By Eq. 9 the most likely digit is {ll['eq9']['most_likely_digit']} " in text
    assert f"Training images average {to_its_se(ll['train_mean'], ll['train_se'])}" in text
    assert f"test images {to_its_se(ll['test_mean'], ll['test_se'])}" in text
    gap = ll["gap"]["mean"]             # Eq. 9 below the Laplace estimate, or (--quick) above it
    assert (f"Eq. 9 is lower by {gap:.1f} nats on average" if gap > 0 else
            f"Eq. 9 is higher by {-gap:.1f} nats on average, so here the Laplace") in text
    assert f"exceeds {min(1 - 1 / math.log10(ll['num_samples']), 0.7):.2f}, above which" in text
    learned = f"{lo['same_budget']['latent_opt']['proposed_train']:.3f}"   # 50 images: 3 decimals
    sb, better = lo["same_budget"], lo["verdicts"]["better_q"] == "amortized"
    val_first = better and sb["amortized"]["proposed_val"] < sb["latent_opt"]["fitted_val"]
    assert (f"against {learned})." if val_first else f"against {learned}, Table 2)" if better
            else f"(MSE {learned} against") in text
    tied = ll["eq9"]["least_likely_tied_with"]       # (b) names Eq. 9's least likely digit's ties
    least = f"the least likely {ll['eq9']['least_likely_digit']} "
    assert least in text
    if tied:
        after = text[text.index(least):]
        assert after.split(")", 1)[1].startswith(", tied with " + str(tied[0])), after[:80]
    eq9_ess = ll["diagnostics"]["eq9"]["median_ess"]
    assert f"{eq9_ess:.1f} of {ll['num_samples']:,} (median" in text
    p = metrics(quick_outputs, "ppca_pca")
    text = reports["lab"]
    pca, ppca, vae = (p[k] for k in ("pca", "ppca_gradient", "vae"))
    assert (f"(sum over pixels, mean over images) is "
            f"{to_its_se(pca['test_sq_error'], pca['test_sq_error_se'])} (mean ± standard") in text
    change = 100 * (vae["test_sq_error"] / ppca["test_sq_error"] - 1)
    assert (f"The VAE's average test squared error is "
            f"{to_its_se(vae['test_sq_error'], vae['test_sq_error_se'])}, {abs(change):.0f} % "
            f"{'lower' if change <= 0 else 'higher'} than PPCA's "
            f"{to_its_se(ppca['test_sq_error'], ppca['test_sq_error_se'])}") in text
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
    ll["eq9"]["train_vs_test"] = "neither" if ll["train_vs_test"] == "train" else "train"
    ll["agreement"] = log_likelihood.agreement(ll, ll["eq9"])   # as the script would record it
    path.write_text(json.dumps(ll))
    path = copy / "vae_amortized" / "metrics.json"
    a = json.loads(path.read_text())
    a["overfit"]["verdict"] = "yes"
    path.write_text(json.dumps(a))
    build(copy)
    text = pdf_text(copy / "report" / "ex1_report.pdf")
    assert f"the most likely digit is {ll['most_likely_digit']} " in text
    changed = "The verdict of (c) changes: training images are more likely"
    assert (changed in text) == (ll["train_vs_test"] == "train")
    assert ("Training images are more likely." in text) == (ll["eq9"]["train_vs_test"] == "train")
    assert "Yes, it starts to overfit" in text


def report_with(quick_outputs, tmp_path, script, edit, pdf="ex1_report.pdf"):
    """A report's text, built from a copy of the quick outputs whose `script` metrics `edit`
    changed in place, and those metrics."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / script / "metrics.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    build(copy)
    return " ".join(pdf_text(copy / "report" / pdf).split()), m


def q3_report_with(quick_outputs, tmp_path, **verdicts):
    """The Ex. 1 report's text, built from the quick outputs with Q3's verdicts set."""
    return report_with(quick_outputs, tmp_path, "vae_latent_opt",
                       lambda lo: lo["verdicts"].update(verdicts))


@pytest.mark.parametrize("gap, opening", [
    ("larger", "No. Its prior samples"), ("same", "Yes. The"),
    ("smaller", "Yes. The")])
def test_q3s_prior_answer_follows_the_measured_variety_gap(quick_outputs, tmp_path, gap, opening):
    """Where the start decides, the verdict follows how much variety prior draws lose against
    the decoder's own training latents, compared with Q1's VAE; the ratios are the metrics'."""
    text, lo = q3_report_with(quick_outputs, tmp_path, variety_gap=gap, start_decides=True,
                              aggregate_near_prior=True, control_prior_greyer=True,
                              outside_gap="same")   # no sentence on prior draws outside first
    assert f"Answer. {opening}" in text
    ratios = [f"{100 * lo[k]['variety_ratio']['ratio']:.0f} %"
              for k in ("prior_vs_aggregate", "amortized_prior_vs_aggregate")]
    assert (f"the images it decodes from prior draws are only {ratios[0]} as varied as those it "
            f"decodes from its own training latents, against {ratios[1]} for Q1's VAE") in text
    if gap != "larger":
        assert {"same": "no larger shortfall than Q1's",
                "smaller": "a smaller shortfall than Q1's"}[gap] in text
    shortfall = {"larger": ". So prior draws fall further short through this decoder",
                 "same": ": the same shortfall for both decoders, within two standard",
                 "smaller": ". So prior draws fall less short through this decoder"}[gap]
    assert f"through Q1's decoder, {ratios[1]}{shortfall}" in text


@pytest.mark.parametrize("decides, near, opening", [
    (True, True, "No. Its prior samples"),
    (False, True, "Not by itself: the KL term of Eq. 6 brings the latents close"),
    (False, False, "No, not by itself: the initialization only sets")])
def test_q3s_prior_answer_follows_the_control_started_wider(quick_outputs, tmp_path, decides,
                                                            near, opening):
    text, lo = q3_report_with(quick_outputs, tmp_path, variety_gap="larger", start_decides=decides,
                              aggregate_near_prior=near, control_prior_greyer=True,
                              outside_gap="same")
    assert f"Answer. {opening}" in text
    wide = lo["wide_start"]
    assert ("Why the start matters." in text) == decides       # its evidence, after the answer
    if decides:
        assert f"{wide['aggregate_posterior_kl']:,.0f} nats from" in text
        ratio = wide["prior_vs_aggregate"]["variety_ratio"]["ratio"]
        assert f"its prior draws keep only {100 * ratio:.0f} % of its training latents' variety" in text


def test_q3s_variety_table_and_curves_are_the_metrics(quick_outputs, tmp_path):
    """Table 3's variety of each decoder's draws, and Q3 (a)'s reconstruction errors at
    Figure 5's epochs on Q1's curve images, with the epoch from which the encoder leads."""
    text, lo = q3_report_with(quick_outputs, tmp_path, better_q="amortized",
                              encoder_nearer_best=True)
    for key in ("prior_vs_aggregate", "amortized_prior_vs_aggregate"):
        for draws in ("aggregate", "prior"):
            v = lo[key]["variety"][draws]
            decimals = build_report.se_decimals(v["se"])
            assert f"{v['mean']:.{decimals}f} ± {v['se']:.{decimals}f}" in text, (key, draws)
    am = json.loads((quick_outputs / "vae_amortized" / "metrics.json").read_text())
    epochs = lo["snapshot_epochs"]
    lo_at = [lo["train_recon_mse"][e - 1] for e in epochs]
    am_at = [am["train_recon_mse"][e - 1] for e in epochs]
    assert f"reconstruct with MSE {build_report.digit_list([f'{x:.3f}' for x in lo_at])}" in text
    ahead = [e for i, e in enumerate(epochs) if all(a < b for a, b in zip(am_at[i:], lo_at[i:]))]
    # the answer says since when Q1's encoder leads, where it leads from some epoch on
    assert ("Latent optimization also learns more slowly" in text) is bool(ahead)
    if ahead:
        assert f"Q1's reconstructions are better from epoch {ahead[0]} on" in text


def test_q1_names_the_digits_figure_3_loses_at_the_last_epoch(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "vae_amortized" / "metrics.json"
    a = json.loads(path.read_text())
    last = str(a["snapshot_epochs"][-1])
    a["reconstructions_read"]["shown_val"][last] = [0, 1, 2, 0, 9, 9, 8, 7, 8, 9]
    a["reconstructions_read"]["val"]["equal_digits"]["accuracy"] = 0.718   # ten images, one per digit
    train_labels = a["reconstructions_read"]["shown_train_labels"]
    a["reconstructions_read"]["shown_train"][last] = [(train_labels[0] + 1) % 10] + train_labels[1:]
    path.write_text(json.dumps(a))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "ex1_report.pdf").split())
    # the count, and which it misreads as what, so that the figure can be held against it
    assert ("Of the ten validation images of Figure 3 it reads six right at the last epoch (the 3 "
            "as a 0, the 6 as an 8, the 4 and 5 as a 9). At the rates measured over all images, "
            "about seven of ten would be expected") in text
    assert "of the ten training images" not in text   # the count the eye disputed is gone


def test_misreads_are_grouped_by_the_digit_read():
    assert build_report.misread_phrase([(3, 8), (4, 9), (6, 8), (7, 9), (5, 9)]) == \
        "the 3 and 6 as an 8, the 4, 5 and 7 as a 9"
    assert build_report.misread_phrase([(2, 1)]) == "the 2 as a 1"
    assert build_report.misread_phrase([]) == ""


@pytest.mark.parametrize("n, words", [(0, "no"), (6, "six"), (10, "ten"), (11, "11"), (1000, "1,000")])
def test_small_counts_are_words_so_they_read_apart_from_digits(n, words):
    assert build_report.small_count(n) == words


def q1_report_with(quick_outputs, tmp_path, edit):
    """The Ex. 1 report's text, built from the quick outputs with Q1's metrics edited."""
    return report_with(quick_outputs, tmp_path, "vae_amortized", edit)[0]


@pytest.mark.parametrize("within, in_se, says", [
    (True, 0.4, ", less than two standard errors (no gap can be measured)."),
    (False, 2.34, ": a small generalization gap, measurable (2.3 standard errors), but not "
                  "overfitting while the validation loss does not rise.")])
def test_q1s_answer_says_whether_the_gap_on_equal_digit_shares_is_measurable(
        quick_outputs, tmp_path, within, in_se, says):
    def edit(a):
        a["overfit"].update(verdict="no", recon_gap=0.013, recon_gap_within_two_se=within,
                            recon_gap_in_se=in_se)
    text = q1_report_with(quick_outputs, tmp_path, edit)
    assert ("With each digit weighted equally in both sets, the validation images' "
            f"reconstruction error differs from the training images' by only +1.3 %{says}") in text
    assert "Answer. No. The validation loss" in text


@pytest.mark.parametrize("improving", [True, False])
def test_q1_calls_the_model_underfitted_only_while_the_validation_loss_still_falls(
        quick_outputs, tmp_path, improving):
    def edit(a):
        a["overfit"].update(verdict="no", still_improving=improving)
    text = q1_report_with(quick_outputs, tmp_path, edit)
    epochs = metrics(quick_outputs, "vae_amortized")["args"]["epochs"]
    assert (f"So after {epochs} epochs the model underfits rather than overfits: more training "
            "would still lower the validation loss" in text) is improving


def test_q1_from_an_older_run_without_equal_digit_shares_compares_the_plain_means(
        quick_outputs, tmp_path):
    def edit(a):
        del a["final_equal_digits"]
        for split in ("train", "val"):
            a["reconstructions_read"][split].pop("equal_digits")
    text = q1_report_with(quick_outputs, tmp_path, edit)
    a = metrics(quick_outputs, "vae_amortized")
    assert "weighted equally" not in text and "The validation images' reconstruction error" in text
    assert to_its_se(a["final_val"]["recon_mse"], a["final_val"]["recon_mse_se"]) in text


def test_report_reads_only(quick_outputs):
    """Nothing under report/ imports torch, the model or a script (only utils' torch-free pieces,
    and a real build never loads torch); no script imports another script."""
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
        assert not imports(path) & {"torch", "torchvision", "model", *SCRIPTS}, path
    for script in SCRIPTS:
        assert not imports(ROOT / f"{script}.py") & set(SCRIPTS), script
    builder = ROOT / "report" / "build_report.py"
    code = (f"import runpy, sys\nsys.argv = ['build_report.py', '--outputs', {str(quick_outputs)!r}]\n"
            f"try:\n    runpy.run_path({str(builder)!r}, run_name='__main__')\n"
            f"finally:\n    print('torch._C' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip().endswith("False"), proc.stderr


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not json", "{}",
                                    "lacks a key", "wrong type", "NaN", "nested deep"])
def test_a_bad_metrics_file_is_one_line_and_keeps_the_pdfs(quick_outputs, tmp_path, damage):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "vae_latent_opt" / "metrics.json"
    text = path.read_text()
    if damage == "missing":
        path.unlink()
    else:
        metrics = json.loads(text)
        lacking = json.dumps({k: v for k, v in metrics.items() if k != "same_budget"})
        wrong_type = json.dumps({**metrics, "same_budget": "oops"})
        nan = json.dumps({**metrics, "wall_seconds": float("nan")})      # json writes NaN
        path.write_text({"empty": "", "truncated": text[: len(text) // 2], "not json": "\x00\xff",
                         "{}": "{}", "lacks a key": lacking, "wrong type": wrong_type,
                         "NaN": nan, "nested deep": "[" * 100_000 + "]" * 100_000}[damage])
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
    template.write_text(template.read_text().replace('"Student name"', '"Ada Lovelace"')
                        .replace('"CSE username"', '"ada01"'))
    proc = run_script("report/build_report.py", "--outputs", copy)
    assert "kept your edited" in proc.stdout
    text = pdf_text(copy / "report" / "ex1_report.pdf")
    assert "Name: Ada Lovelace" in text and "CSE username: ada01" in text
    assert "Ada Lovelace" in template.read_text()


def test_a_lost_stamp_keeps_an_edited_copy_and_updates_an_unedited_one(quick_outputs, tmp_path):
    """Without .ex1.typ.sha256 (deleted, or not copied along), a copy equal to the repository's
    template is still ours and is replaced; one that differs is the student's and is kept."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    report = copy / "report"
    (report / ".ex1.typ.sha256").unlink()
    (report / ".apml_lab.typ.sha256").unlink()
    edited = (report / "ex1.typ").read_text() + "\n// my notes\n"
    (report / "ex1.typ").write_text(edited)
    proc = run_script("report/build_report.py", "--outputs", copy)
    assert proc.stdout.count("kept your edited") == 1 and "ex1.typ" in proc.stdout
    assert (report / "ex1.typ").read_text() == edited
    assert (report / ".apml_lab.typ.sha256").is_file()      # the unedited copy is ours again


def test_a_killed_builds_temporary_files_go_and_a_running_build_is_waited_for(quick_outputs,
                                                                              tmp_path):
    """What a killed build left (an atomic write's temporary file) is removed by the next one,
    a user's own file of a similar name is not; a second build while one runs is refused."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    report = copy / "report"
    leftover, own = report / ".ex1_report.k3x_9a2b.tmp.pdf", report / ".notes.tmp.txt"
    leftover.write_bytes(b"%PDF half")
    own.write_text("mine")
    run_script("report/build_report.py", "--outputs", copy)       # the script claims the folder
    assert not leftover.exists() and own.read_text() == "mine"
    (report / ".lock").write_text(f"{os.getpid()}\n")          # a live process holds it
    assert_refused_keeping_the_pdfs(copy, f"another run (process {os.getpid()}) is writing")
    assert "choose another --outputs" in run_script("report/build_report.py", "--outputs", copy,
                                                    check=False).stderr


def math_call_semicolons(source: str) -> list:
    """(line, column) of every ';' that Typst would read as a row separator: inside the
    parentheses of a call (an opening '(' right after a name or a ')') in math, not escaped as
    '\\;'. Comments, strings and escaped characters are skipped; nested content blocks [..]
    inside math leave math mode."""
    found, stack, i, line, col = [], [], 0, 1, 1   # stack: "math", "(call", "(", "[", "{"
    in_math = lambda: any(s == "math" for s in stack) and not any(   # noqa: E731
        s in ("[", "{") for s in stack[[k for k, s in enumerate(stack) if s == "math"][-1]:])
    while i < len(source):
        ch = source[i]
        two = source[i:i + 2]
        if two == "//" and (not stack or stack[-1] != "str"):
            j = source.find("\n", i)
            i = len(source) if j < 0 else j
            continue
        if ch == "\\":
            i, col = i + 2, col + 2
            continue
        if stack and stack[-1] == "str":
            if ch == '"':
                stack.pop()
        elif ch == '"' and (in_math() or (stack and stack[-1] in ("{", "(", "(call"))):
            stack.append("str")
        elif ch == "$":
            if stack and stack[-1] == "math":
                stack.pop()
            else:
                stack.append("math")
        elif ch == "(":
            prev = source[i - 1] if i else " "
            stack.append("(call" if (prev.isalnum() or prev in "_)") else "(")
        elif ch == ")" and stack and stack[-1] in ("(", "(call"):
            stack.pop()
        elif ch in "[{":
            if not in_math() or source[i - 1] == "#":   # in math, brackets are just brackets
                stack.append(ch)
        elif ch in "]}" and stack and stack[-1] == {"]": "[", "}": "{"}[ch]:
            stack.pop()
        elif ch == ";" and stack and stack[-1] == "(call" and in_math():
            found.append((line, col))
        if ch == "\n":
            line, col = line + 1, 0
        i, col = i + 1, col + 1
    return found


def test_no_unescaped_semicolon_inside_a_math_call():
    """`N(x; mu, C)` in Typst math loses its ';' (it separates the rows of a 2-D argument)."""
    assert math_call_semicolons("$ cal(N)(x; mu, C) $") == [(1, 11)]
    assert math_call_semicolons('$ "KL"[q || p] = f(z_i; 0) $') == [(1, 23)]
    assert math_call_semicolons("$ cal(N)(x\\; mu, C) $ and f(a; b) in text") == []
    assert math_call_semicolons('$ f(#g("a; b")) $ // $ h(x; y) $') == []
    for name in ("ex1.typ", "apml_lab.typ"):
        assert math_call_semicolons((ROOT / "report" / name).read_text()) == [], name


def test_the_pdf_shows_the_argument_apart_from_the_mean(reports):
    """3.3 and 3.4 as the lab writes them: N(x; mu, WW^T + sigma^2 I) and N(z; M^-1 W^T ...)."""
    import unicodedata
    text = re.sub(r"[\s\ufe00-\ufe0f]+", "", unicodedata.normalize("NFKC", reports["lab"]))
    assert "p(x)=N(x;μ,WW" in text
    assert "p(z|x)=N(z;M" in text


def test_a_typst_error_names_the_templates_line_and_column(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    template = copy / "report" / "apml_lab.typ"
    lines = template.read_text().splitlines()
    target = next(k for k, l in enumerate(lines) if l.startswith("= Lab: PCA"))
    lines.insert(target + 1, "#let broken = (1, 2")
    template.write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in (copy / "report").glob("*.pdf")}
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"line {target + 2}, column " in proc.stderr and "apml_lab.typ" in proc.stderr
    assert "move your edited copy aside" in proc.stderr and "delete" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (copy / "report").glob("*.pdf")} == before


@pytest.mark.parametrize("damage, says", [
    ("latin-1", "is not UTF-8 text"),
    ("page-count", "its last line must stay"),
    ("page-count lost", "its last line must stay")])
def test_a_template_saved_as_latin_1_or_with_its_page_count_changed_is_one_line(
        quick_outputs, tmp_path, damage, says):
    """An edited template in another encoding (an old Windows editor), or whose last line no
    longer counts pages: one line, exit 2, the PDFs as they were."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    template = copy / "report" / "ex1.typ"
    text = template.read_text(encoding="utf-8")
    if damage == "latin-1":
        template.write_bytes(text.replace('"Student name"', '"Renée Dupré"').encode("latin-1",
                                                                                  "replace"))
    else:
        lines = text.rstrip("\n").splitlines()
        last = [] if damage == "page-count lost" else ['#metadata("five") <page-count>']
        template.write_text("\n".join(lines[:-1] + last) + "\n", encoding="utf-8")
    assert_refused_keeping_the_pdfs(copy, says)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX pipes")
@pytest.mark.parametrize("reader", ["stdout into a closed pipe", "stderr closed"])
def test_a_reader_that_goes_away_stops_the_output_not_the_build(quick_outputs, tmp_path, reader):
    """`build_report.py | head -c 0`, or run with its stderr closed: every "wrote" line is lost,
    but both PDFs and the record of what they were typeset from are written (exit 0), never
    one PDF new and the other old, and no traceback."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    written = [copy / "report" / n for n in ("ex1_report.pdf", "apml_lab_report.pdf", ".built_from.json")]
    for path in written:
        path.unlink()
    command = [sys.executable, str(ROOT / "report" / "build_report.py"), "--outputs", str(copy)]
    if reader == "stderr closed":
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda: os.close(2))
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)                   # the reader is gone before the first line
        try:
            proc = subprocess.run(command, cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
        finally:
            os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in (proc.stderr or ""), proc.stderr
    assert "Exception ignored" not in (proc.stderr or "")
    assert all(path.is_file() for path in written)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX pipes")
def test_a_metrics_file_that_is_a_pipe_is_one_line_not_a_wait(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    (copy / "sup_classification" / "metrics.json").unlink()
    os.mkfifo(copy / "sup_classification" / "metrics.json")
    assert_refused_keeping_the_pdfs(copy, "is unreadable (not a regular file)")


def test_a_metric_of_the_wrong_type_is_not_blamed_on_an_unedited_template(quick_outputs, tmp_path):
    """A verdict edited into a string reaches Typst, which stops in the template: the message
    must say that the value is at fault (the template is the repository's), and never advise
    deleting the student's file."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "sup_classification" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "above_course_bar": "yes"}))
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the template is the repository's own" in proc.stderr and "delete" not in proc.stderr


def test_the_advice_to_run_a_script_again_keeps_quick(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    (copy / "ppca_pca" / "metrics.json").unlink()
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and "python ppca_pca.py --quick --out " in proc.stderr, proc.stderr


@pytest.mark.parametrize("damage", ["values a list", "values nested deep", "template not utf-8"])
def test_a_damaged_report_folder_is_one_line_for_the_submission(quick_outputs, tmp_path, damage):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    report = copy / "report"
    if damage == "values a list":
        (report / "ex1_values.json").write_text("[]")
    elif damage == "values nested deep":
        (report / "ex1_values.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        with open(report / "ex1.typ", "ab") as f:
            f.write(b"\xff\xfe")
    proc = run_script("report/submission.py", "--outputs", copy, "--name", "Ada", "--cse",
                      "ada01", check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0 or proc.stderr.count("\n") == 1, proc.stderr
    if damage == "template not utf-8":
        assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr


def make_submission(outputs, *assignments):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "submission", f"OUT={outputs}",
                           "FLAGS=--quick", "DEVICE=cpu", f"PY={shlex.quote(sys.executable)}", "VENV_DEP=",
                           *assignments], env=dict(os.environ, TQDM_DISABLE="1"),
                          capture_output=True, text=True, timeout=600)


def filled_in(outputs, tmp_path):
    """A copy of the outputs whose ex1.typ a student has filled in (name, username, AI tools)."""
    copy = tmp_path / "outputs"
    shutil.copytree(outputs, copy)
    template = copy / "report" / "ex1.typ"
    template.write_text(template.read_text().replace('"Student name"', '"Ada Lovelace"')
                        .replace('"CSE username"', '"ada01"')
                        .replace("*FILL IN (Sec. 4.1.1).*", "*My account.*")
                        .replace("_Default, true of how this solution", "_Mine, true of how this solution"))
    return copy


def test_make_submission_packs_what_sec_4_3_3_asks(quick_outputs, tmp_path):
    outputs = filled_in(quick_outputs, tmp_path)
    proc = make_submission(outputs, "NAME=Ada Lovelace", "CSE=ada01")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    path = outputs / "ex1_submission_ada01.zip"
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        readme = zf.read("README.txt").decode()
        pdf = zf.read("ex1_report.pdf")
        code = {n: zf.read(n).decode() for n in names if n.endswith(".py")}
    assert "Ada Lovelace" in readme and "ada01" in readme
    # make rebuilt the PDF from the edited template before packing it
    assert pdf == (outputs / "report" / "ex1_report.pdf").read_bytes()
    assert "note: the report shows" not in proc.stdout       # the same name in both places
    proc = run_script("report/submission.py", "--outputs", outputs, "--name", "Ada King",
                      "--cse", "ada01")
    assert "note: the report shows the name 'Ada Lovelace', the zip's README 'Ada King'" in proc.stdout
    assert "Ada Lovelace" in pdf_text(outputs / "report" / "ex1_report.pdf")
    assert {"sup_classification.py", "vae_amortized.py", "vae_latent_opt.py",
            "log_likelihood.py", "model.py", "utils.py", "requirements.txt",
            "requirements-data.txt"} <= names
    assert "ppca_pca.py" not in names                   # the other course's lab
    # every local module a packed script imports is packed too
    local = {p.stem for p in ROOT.glob("*.py")}
    for name, source in code.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""])
                for mod in mods:
                    if mod.split(".")[0] in local:
                        assert f"{mod.split('.')[0]}.py" in names, (name, mod)


@pytest.mark.parametrize("unfilled, expected", [
    ('"Ada Lovelace"', "template's name (its first lines"),
    ('"ada01"', "template's CSE username (its first lines"),
    ("*My account.*", "template's FILL IN box"),
    ("_Mine, true of how this solution", "default account of the AI-tools section"),
    (None, "is older than your edits")])
def test_a_report_with_a_placeholder_or_older_than_its_edits_is_not_packed(quick_outputs, tmp_path,
                                                                            unfilled, expected):
    outputs = filled_in(quick_outputs, tmp_path)
    build(outputs)
    values = outputs / "report" / "ex1_values.json"         # as a full run's report
    values.write_text(json.dumps({**json.loads(values.read_text()), "quick": False}))
    template = outputs / "report" / "ex1.typ"
    text = template.read_text()
    if unfilled:
        text = text.replace(unfilled, {'"Ada Lovelace"': '"Student name"',
                                       '"ada01"': '"CSE username"',
                                       "*My account.*": "*FILL IN (Sec. 4.1.1).*"}.get(
            unfilled, "_Default, true of how this solution"))
    template.write_text(text + "\n")
    os.utime(template, (template.stat().st_atime, template.stat().st_mtime + 5))
    proc = run_script("report/submission.py", "--outputs", outputs, "--name", "Ada",
                      "--cse", "ada01", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not list(outputs.glob("*.zip"))


def test_code_edited_since_the_runs_is_not_packed_and_the_readme_is_readable(quick_outputs,
                                                                             tmp_path):
    """Each run records the SHA-256 of the code it ran; a zip would otherwise pack code that
    did not make the report's numbers. README.txt in the zip unpacks readable (0644)."""
    outputs = filled_in(quick_outputs, tmp_path)
    build(outputs)
    run_script("report/submission.py", "--outputs", outputs, "--name", "Ada", "--cse", "ada01")
    with zipfile.ZipFile(outputs / "ex1_submission_ada01.zip") as zf:
        assert (zf.getinfo("README.txt").external_attr >> 16) & 0o777 == 0o644
    path = outputs / "sup_classification" / "metrics.json"
    m = json.loads(path.read_text())
    assert set(m["code"]) == {"sup_classification.py", "model.py", "utils.py"}
    m["code"]["sup_classification.py"] = "0" * 64      # as if the script was edited since
    path.write_text(json.dumps(m))
    build(outputs)
    (outputs / "ex1_submission_ada01.zip").unlink()
    proc = run_script("report/submission.py", "--outputs", outputs, "--name", "Ada",
                      "--cse", "ada01", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "sup_classification.py changed since the runs" in proc.stderr
    assert "make -B quick FLAGS=--fresh" in proc.stderr     # a quick run is redone as one
    assert not list(outputs.glob("*.zip"))


@pytest.mark.parametrize("change, expected", [
    ("template dated back", "is older than your edits"),
    ("a metrics.json rewritten", "vae_amortized/metrics.json changed"),
    ("no record", ".built_from.json"),
])
def test_the_zip_packs_only_a_pdf_typeset_from_what_is_there_now(quick_outputs, tmp_path, change,
                                                                expected):
    """Compared by content, not by file times: a filled-in template copied back with an old
    date, or a script run again after the report, leaves a PDF that shows neither."""
    outputs = tmp_path / "outputs"
    shutil.copytree(quick_outputs, outputs)
    build(outputs)
    values = outputs / "report" / "ex1_values.json"         # as a full run's report
    values.write_text(json.dumps({**json.loads(values.read_text()), "quick": False}))
    if change == "template dated back":
        shutil.copy(filled_in(quick_outputs, tmp_path / "student") / "report" / "ex1.typ",
                    outputs / "report" / "ex1.typ")
        os.utime(outputs / "report" / "ex1.typ", (0, 0))   # 1970: older than the PDF
    else:
        template = outputs / "report" / "ex1.typ"      # filled in, and typeset again
        template.write_text(filled_in(quick_outputs, tmp_path / "student").joinpath(
            "report", "ex1.typ").read_text())
        build(outputs)
        values.write_text(json.dumps({**json.loads(values.read_text()), "quick": False}))
        if change == "a metrics.json rewritten":
            path = outputs / "vae_amortized" / "metrics.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "wall_seconds": 1.0}))
        else:
            (outputs / "report" / ".built_from.json").unlink()
    proc = run_script("report/submission.py", "--outputs", outputs, "--name", "Ada Lovelace",
                      "--cse", "ada01", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not list(outputs.glob("*.zip"))


def test_a_deleted_figure_is_one_line_naming_the_script_that_draws_it(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    (copy / "vae_amortized" / "loss_curves.png").unlink()
    before = {p.name: p.read_bytes() for p in (copy / "report").glob("*.pdf")}
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "loss_curves.png is missing: run python vae_amortized.py" in proc.stderr
    assert "--quick" in proc.stderr
    assert {p.name: p.read_bytes() for p in (copy / "report").glob("*.pdf")} == before


def test_a_report_from_quick_and_full_runs_mixed_is_refused(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "vae_amortized" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "args": {**metrics["args"], "quick": False}}))
    before = {p.name: p.read_bytes() for p in (copy / "report").iterdir()}
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "mixes --quick and full runs (vae_amortized is a full)" in proc.stderr
    assert {p.name: p.read_bytes() for p in (copy / "report").iterdir()} == before


def test_a_quick_runs_report_is_packed_despite_its_placeholders_with_a_note(quick_outputs,
                                                                            tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    proc = run_script("report/submission.py", "--outputs", copy, "--name", "Ada", "--cse", "ada01")
    assert "note:" in proc.stdout and "--quick run" in proc.stdout
    assert (copy / "ex1_submission_ada01.zip").is_file()


def test_a_killed_packs_temporary_zip_is_removed_by_the_next_pack(quick_outputs, tmp_path):
    """SIGKILL while zipping leaves write_atomic's temporary beside the zip; the next pack
    removes it once it is a minute old (younger, another pack may be writing it), and only ours."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    killed = copy / ".ex1_submission_ada01.k1ll3d_x.tmp.zip"
    writing = copy / ".ex1_submission_ada01.wr1t1ng_.tmp.zip"
    mine = copy / ".ex1_submission_ada01.notes.tmp.zip"     # not a name write_atomic gives
    for path in (killed, writing, mine):
        path.write_bytes(b"PK")
    os.utime(killed, (time.time() - 120, time.time() - 120))
    os.utime(mine, (time.time() - 120, time.time() - 120))
    run_script("report/submission.py", "--outputs", copy, "--name", "Ada", "--cse", "ada01")
    assert not killed.exists() and writing.exists() and mine.exists()
    assert zipfile.is_zipfile(copy / "ex1_submission_ada01.zip")


@pytest.mark.parametrize("assignments", [["CSE=ada01"], ["NAME=  ", "CSE=ada01"],
                                         ["NAME=Ada Lovelace"], ["NAME=Ada", "CSE="]])
def test_make_submission_without_name_or_username_is_one_line(quick_outputs, assignments):
    before = sorted(p.name for p in quick_outputs.glob("*.zip"))
    proc = make_submission(quick_outputs, *assignments)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and ("NAME" in proc.stderr or "CSE" in proc.stderr)
    assert proc.stdout == ""
    assert sorted(p.name for p in quick_outputs.glob("*.zip")) == before


@pytest.mark.parametrize("cse", ["-ada", "..", ".", "ada/01", "a" * 65])
def test_a_username_that_could_be_an_option_or_a_path_is_refused(quick_outputs, cse):
    before = sorted(p.name for p in quick_outputs.glob("*.zip"))
    proc = run_script("report/submission.py", "--outputs", quick_outputs, "--name=Ada",
                      f"--cse={cse}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not a CSE username" in proc.stderr
    assert sorted(p.name for p in quick_outputs.glob("*.zip")) == before


@pytest.mark.parametrize("cse", ["-ada", "ada/01", ".."])
def test_make_submission_refuses_a_bad_username_before_it_typesets(quick_outputs, tmp_path, cse):
    """make submission typesets only once NAME and CSE are good: a bad one is one line (exit 2)
    and the report folder is left as it was (a typeset would write ex1_values.json again)."""
    outputs = filled_in(quick_outputs, tmp_path)
    (outputs / "report" / "ex1_values.json").unlink()
    before = {p.name: p.read_bytes() for p in (outputs / "report").iterdir()}
    proc = make_submission(outputs, "NAME=Ada Lovelace", f"CSE={cse}")
    # make adds its own line ("make: ***", or "make[1]: ***" under make test)
    ours = [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert proc.returncode == 2 and len(ours) == 1, proc.stdout + proc.stderr
    assert "is not a CSE username" in ours[0]
    assert {p.name: p.read_bytes() for p in (outputs / "report").iterdir()} == before
    assert not list(outputs.glob("*.zip"))


@pytest.mark.parametrize("damage", ["zip is a folder", "nul in the record"])
def test_a_zip_path_taken_by_a_folder_or_a_crafted_record_is_one_line(quick_outputs, tmp_path,
                                                                      damage):
    """A folder where the zip goes is refused before anything is typeset; a record of what the
    PDF was typeset from that names a file with a NUL byte is refused as out of date."""
    outputs = filled_in(quick_outputs, tmp_path)
    if damage == "zip is a folder":
        (outputs / "ex1_submission_ada01.zip").mkdir()
        (outputs / "report" / "ex1_values.json").unlink()     # a typeset would write it again
    else:
        (outputs / "report" / ".built_from.json").write_text(
            json.dumps({"ex1": {"template": "x", "metrics": {"a\u0000b": "x"}}}))
    proc = run_script("report/submission.py", "--outputs", outputs, "--name", "Ada Lovelace",
                      "--cse", "ada01", *(["--typeset"] if damage == "zip is a folder" else []),
                      check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    if damage == "zip is a folder":
        assert "is not a file, but the zip goes there" in proc.stderr
        assert not (outputs / "report" / "ex1_values.json").exists()
    else:
        assert "run make report, then pack again" in proc.stderr


def test_an_interruption_between_the_two_pdfs_says_which_one_is_new(quick_outputs, tmp_path,
                                                                     monkeypatch, capsys):
    """Ctrl-C after the first PDF is replaced and before the second: the line says that one
    report is already new and the command must run again (exit 130)."""
    import utils

    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    real = build_report.write_bytes

    def interrupted(path, data):
        if path.name == "apml_lab_report.pdf":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(build_report, "write_bytes", interrupted)
    with pytest.raises(SystemExit) as exit_:
        utils.run_main(lambda run, argv: build_report.main(argv, run), ["--outputs", str(copy)],
                       product="the reports", out_flag="--outputs")
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.count("\n") == 1, err
    assert "ex1_report.pdf already new" in err and "run the same command" in err


@pytest.mark.parametrize("folder, key, value, says", [
    ("vae_amortized_elbo", "loss", "exercise", "holds a run with --loss exercise"),
    ("vae_amortized", "loss", "elbo", "holds a run with --loss elbo"),
    ("log_likelihood_elbo", "checkpoint", "o/vae_amortized/vae_final.pt", "evaluated o/vae_amortized"),
    ("log_likelihood", "checkpoint", "o/vae_amortized_elbo", "evaluated o/vae_amortized_elbo")])
def test_a_folder_holding_another_run_than_its_name_is_refused(quick_outputs, tmp_path, folder,
                                                               key, value, says):
    """The ablation's folder trained on the exercise's loss (its --loss forgotten), or a Q4
    folder that evaluated the other VAE: the report would describe a run that was not made."""
    copy = edited_copy(quick_outputs, tmp_path, folder, lambda m: m["args"].update({key: value}))
    assert_refused_keeping_the_pdfs(copy, says)


def test_a_missing_metrics_file_names_the_make_command_for_its_folder(quick_outputs, tmp_path):
    copy = tmp_path / "quick"
    shutil.copytree(quick_outputs, copy)
    (copy / "vae_latent_opt" / "metrics.json").unlink()
    proc = run_script("report/build_report.py", "--outputs", copy, check=False)
    assert proc.returncode == 2 and "from the repository's folder, run python vae_latent_opt.py" \
        in proc.stderr and f"(or make quick OUT={tmp_path})" in proc.stderr, proc.stderr


@pytest.mark.parametrize("trust", ["yes", "no"])
@pytest.mark.parametrize("verdict, opening", [
    ("neither", "(c) Neither set is measurably more likely:"),
    ("train", "(c) Training images are more likely:"),
    ("test", "(c) Training images are less likely:")])
def test_q4c_opens_with_its_verdict_whether_or_not_eq9_converged(quick_outputs, tmp_path, trust,
                                                                  verdict, opening):
    def edit(ll):
        ll["eq9"]["train_vs_test"], ll["trust"]["eq9"] = verdict, trust

    copy = edited_copy(quick_outputs, tmp_path, "log_likelihood", edit)
    build(copy)
    text = pdf_text(copy / "report" / "ex1_report.pdf")
    assert opening in text
    others = {"(c) Neither set is measurably more likely:", "(c) Training images are more likely:",
              "(c) Training images are less likely:"} - {opening}
    assert not any(o in text for o in others)


def test_no_else_starts_a_line_in_the_templates():
    """In Typst markup `]` + newline + `else [...]` ends the #if: the else branch is printed."""
    for name in ("ex1.typ", "apml_lab.typ"):
        lines = (ROOT / "report" / name).read_text().splitlines()
        assert [k + 1 for k, l in enumerate(lines) if re.match(r"\s*else\b", l)] == [], name


def test_no_semicolon_is_swallowed_after_an_embedded_expression():
    """In Typst markup a `;` right after an embedded expression (`#if ... [...];`) ends that
    expression and is not printed: the sentence loses its semicolon. Write `\\;` instead."""
    for name in ("ex1.typ", "apml_lab.typ"):
        text = (ROOT / "report" / name).read_text()
        assert re.findall(r"\][ \t]*;", text) == [], name
        assert re.findall(r"#[a-z_][\w.]*;", text) == [], name        # `#v.key;` too


def test_no_straight_apostrophe_after_a_digit():
    """Typst sets `1's` with a prime-like mark after a digit (Part 1´s), and so after a
    reference, which ends in its number (`@fig-q4a's`: Figure 7´s): write `1’s`."""
    for name in ("ex1.typ", "apml_lab.typ"):
        text = (ROOT / "report" / name).read_text()
        assert re.findall(r"\d's|@[\w-]+'s", text) == [], name


def test_every_figure_and_table_is_captioned_labelled_and_cited():
    """A grader meets every figure and table by its number: each has a caption and a label, and
    the text cites each label at least once."""
    for name in ("ex1.typ", "apml_lab.typ"):
        source = "\n".join(line.split("//")[0] if line.lstrip().startswith("//") else line
                           for line in (ROOT / "report" / name).read_text().splitlines())
        figures = source.count("#figure(")
        assert figures == len(re.findall(r"caption: *\[", source)), name
        labels = re.findall(r"<((?:fig|tab)-[\w-]+)>", source)
        assert len(labels) == figures, (name, labels)
        for label in labels:
            assert f"@{label}" in source, (name, label)


def test_the_labs_kept_table_and_sample_blur_are_the_metrics(quick_outputs):
    p = metrics(quick_outputs, "ppca_pca")
    values = json.loads((quick_outputs / "report" / "apml_lab_values.json").read_text())
    rows = {r["label"]: r for r in values["kept_table"]}
    checks = {r["label"]: r for r in values["check_table"]}     # Table 3, the rule's checks
    assert "test images, blurred" not in rows
    for name, key, table in [("PCA", "pca", rows), ("VAE, 2-D latent", "vae", rows),
                             ("test images", "original_images", rows),
                             ("test images, blurred", "blurred_test_images", checks),
                             ("PCA", "pca", checks)]:
        kept = p[key]["nearest_digit"]
        assert table[name]["all"] == f"{100 * kept['kept']:.0f}"
        assert table[name]["per_digit"] == [f"{100 * kept['per_digit'][str(d)]['kept']:.0f}"
                                            for d in range(10)]
    # the two checks on the naming rule, for PCA: precision ('—' where no image is named as the
    # digit) and share kept minus false alarms (the false alarms are checked against sklearn in
    # test_ppca_pca.py)
    checks = {r["label"]: r["per_digit"] for r in values["check_table"]}
    per = p["pca"]["nearest_digit"]["per_digit"]
    assert checks["PCA: precision"] == [
        "—" if per[str(d)]["precision"] is None else f"{100 * per[str(d)]['precision']:.0f}"
        for d in range(10)]
    score = p["answers"]["beyond_false_alarms"]["pca"]
    assert checks["PCA: kept − false alarms"] == [
        f"{100 * score[str(d)]:.0f}".replace("-", "\u2212") for d in range(10)]
    for d in map(str, range(10)):
        assert score[d] == pytest.approx(per[d]["kept"] - per[d]["false_alarm"])
    blur = p["prior_sample_mid_grey"]
    assert values["grey"]["vae"] == f"{100 * blur['vae']:.0f}\u00a0%"
    assert values["vae_samples_sharper"] == (blur["vae"] < blur["ppca"])


def test_the_lab_names_the_crowded_groups_and_the_digits_apart(reports, quick_outputs):
    groups = metrics(quick_outputs, "ppca_pca")["answers"]["code_groups"]["pca"]
    text = " ".join(reports["lab"].split())
    for group in groups:
        if len(group) > 1:
            assert "{" + ", ".join(map(str, group)) + "}" in text, group


@pytest.mark.parametrize("k, n, phrase", [(2, 2, "both digits"), (3, 3, "all three digits"),
                                          (1, 8, "one of the eight digits"),
                                          (0, 8, "none of the eight digits"), (1, 1, "the digits")])
def test_a_count_reads_as_words(k, n, phrase):
    assert build_report.some_of(k, n, "digits") == phrase


@pytest.mark.parametrize("digit, phrase", [(8, "an 8"), ("8", "an 8"), (9, "a 9"), (0, "a 0"),
                                           (1, "a 1")])
def test_a_digit_takes_the_article_its_spoken_name_needs(digit, phrase):
    assert build_report.a_digit(digit) == phrase


@pytest.mark.parametrize("fit_minus_encoder, opening", [   # (math prints as other letters: skipped)
    (0.0061, r"The amortized encoder\. It proposes a .{1,3} for a new image in one pass: its .{1,8} reconstruct the"),
    (0.0059, r"The amortized encoder\. Its .{1,8} reconstruct the same"),
    (-0.05, r"The amortized encoder\. Its .{1,8} reconstruct the same")])
def test_q3a_opens_with_the_validation_images_where_the_encoder_wins_there(
        quick_outputs, tmp_path, fit_minus_encoder, opening):
    """The question compares validation reconstructions: the answer leads with them when the
    encoder's one-pass proposals beat latent optimization's fits there by more than two
    standard errors of the paired difference (here 2 x 0.003), else with training."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "vae_latent_opt" / "metrics.json"
    lo = json.loads(path.read_text())
    lo["verdicts"].update(better_q="amortized", encoder_nearer_best=False)
    lo["same_budget"]["paired"]["val_fit_vs_encoder"] = {"mean": fit_minus_encoder, "se": 0.003}
    path.write_text(json.dumps(lo))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "ex1_report.pdf").split())
    assert re.search(r"Answer\. " + opening, text)


def test_q4c_gives_the_paired_difference_when_it_agrees(quick_outputs, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "log_likelihood" / "metrics.json"
    ll = json.loads(path.read_text())
    ll["eq9"].update(train_vs_test="neither", paired_train_minus_test=-9.7,
                     paired_train_minus_test_se=19.5)
    path.write_text(json.dumps(ll))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "ex1_report.pdf").split())
    assert ("Paired by digit, training minus test is −10 ± 20 nats by Eq. 9 (within two standard "
            "errors) and") in text.replace("-", "−")
    # the answer gives the difference alone; the means it comes from follow, rounded
    assert "(c) Neither set is measurably more likely: training images average" in text
    assert "training minus test (unrounded means)" in text


@pytest.mark.parametrize("val_minus_train, two_se, hidden", [(0.0019, 45.2, True),
                                                             (0.0019, 4.0, False),
                                                             (-0.0019, 45.2, False)])
def test_q1s_reconstruction_gap_in_nats_is_the_gaussian_decoders_log_density(val_minus_train,
                                                                             two_se, hidden):
    """Q4 (c)'s 'worth only about N nats': the mean log N(x; G, sigma_p^2 I) over 784 pixels of
    images reconstructed with Q1's validation MSE, minus that with its training MSE
    (torch.distributions), and said only when it is positive and under Eq. 9's two standard
    errors."""
    import torch
    from torch.distributions import Normal

    sigma_p, train_mse = 0.4, 0.1312
    gen = torch.Generator().manual_seed(0)

    def mean_log_density(mse):
        g = torch.rand(200, 784, generator=gen, dtype=torch.float64) * 2 - 1
        noise = torch.randn(200, 784, generator=gen, dtype=torch.float64)
        noise *= (mse * 784 / (noise ** 2).sum(1, keepdim=True)).sqrt()    # exactly this MSE
        return Normal(g, sigma_p).log_prob(g + noise).sum(1).mean().item()

    expected = mean_log_density(train_mse) - mean_log_density(train_mse + val_minus_train)
    amortized = {"final_equal_digits": {"train": {"recon_mse": train_mse},
                                        "val": {"recon_mse": train_mse + val_minus_train}}}
    likelihood = {"sigma_p": sigma_p, "eq9": {"train_minus_test_se": two_se / 2}}
    got = build_report.q1_gap_in_nats(amortized, likelihood)
    assert got["q1_gap_nats"] == build_report.num(expected, 0)
    assert got["q1_gap_hidden"] is hidden
    # an older run without equal digit shares: the plain final means
    older = {"final_train": {"recon_mse": train_mse},
             "final_val": {"recon_mse": train_mse + val_minus_train}}
    assert build_report.q1_gap_in_nats(older, likelihood) == got


@pytest.mark.parametrize("val_minus_train, says, train_minus_test",
                         [(0.0019, True, -9.0), (0.0019, True, 9.0), (0.05, False, -9.0)])
def test_q4c_says_what_q1s_gap_is_worth_only_where_these_images_could_not_show_it(
        quick_outputs, tmp_path, val_minus_train, says, train_minus_test):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    paths = {name: copy / name / "metrics.json" for name in ("vae_amortized", "log_likelihood")}
    a, ll = (json.loads(path.read_text()) for path in paths.values())
    equal = a["final_equal_digits"]
    equal["val"]["recon_mse"] = equal["train"]["recon_mse"] + val_minus_train
    ll["eq9"].update(train_vs_test="neither", train_minus_test=train_minus_test,
                     train_minus_test_se=22.6)
    ll["sigma_p"] = 0.4
    for path, m in zip(paths.values(), (a, ll)):
        path.write_text(json.dumps(m))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "ex1_report.pdf").split())
    nats = round(784 * val_minus_train / (2 * 0.4 ** 2))
    assert (f"is worth only about {nats} nats of" in text) is says
    assert ("these images could not show it" in text) is says
    # Q1's gap predicts training images likelier: a difference of the other sign is named as such
    assert ("has the other sign, as chance allows" in text) is (says and train_minus_test < 0)


def test_q3a_compares_the_decoders_by_the_refits_and_the_proposals_by_their_shortfall(
        quick_outputs, tmp_path):
    """A refit to each frozen decoder compares the decoders; how far each method's own
    proposals fall short of it compares the proposals: both named as such, with the metrics'
    shortfalls and their standard errors. Where the encoder wins that comparison, the answer
    leads with it."""
    same = metrics(quick_outputs, "vae_latent_opt")["same_budget"]

    # both shortfalls to the decimals of the finer standard error
    d = max(build_report.se_decimals(same[k]["shortfall"]["se"]) for k in ("amortized", "latent_opt"))
    am, lo = (f"{same[k]['shortfall']['mean']:.{d}f} ± {same[k]['shortfall']['se']:.{d}f}"
              for k in ("amortized", "latent_opt"))
    paired = same["paired"]["val_fit_vs_encoder"]     # the encoder better by two paired SEs
    val_better = paired["mean"] > 2 * paired["se"]
    for nearer in (False, True):
        text, _ = q3_report_with(quick_outputs, tmp_path / str(nearer), better_q="amortized",
                                 encoder_nearer_best=nearer)
        text = text.replace("\u2212", "-")
        if nearer:
            # the answer opens with the proposals' comparison, each decoder held fixed, and
            # gives the validation images' comparison, which the question names, as the whole
            # methods' (graders 157, 160: that gap is the decoders')
            assert re.search(r"Answer\. The amortized encoder, after the exercise's \d+ epochs\. "
                             r"On the training images of Table 2, with each decoder held fixed", text)
            assert (re.search(r"On validation images, which the exercise compares, the whole methods "
                              r"differ too, decoders included \(below\): the one- ?pass", text)
                    is not None) is val_better
            # (since when the encoder leads: test_q3s_variety_table_and_curves_are_the_metrics)
            assert re.search(rf"On the training images of Table 2, with each decoder held fixed, the encoder's "
                             rf".{{1,8}} fall short of a \d+-step refit from a random start by only "
                             rf"{re.escape(am)}, the learned .{{1,6}} by {re.escape(lo)} \(paired difference [+-]\d",
                             text)
            # the body says why, then separates the proposals from the decoders
            assert "Why. The encoder is one network" in text
            assert "Proposals or decoders? The two decoders differ too: refitting" in text
            assert "the rest is the proposals' own" in text
            # on validation images, the decoders' share beside the whole methods' gap
            assert re.search(r"On the validation images the refits alone differ by [+-]\d[0-9.]* ± "
                             r"[0-9.]+, the whole methods by [+-]\d[0-9.]* ± [0-9.]+: the answer's "
                             r"validation comparison is of methods, decoders included\.", text)
            assert "measures the proposals alone" not in text
        else:
            assert "the decoders: " in text and "measures the proposals alone" in text
            assert "Its proposals come closer to what a refit" not in text
            assert f"measures the proposals alone: {am} for the encoder's" in text
            assert f"{lo} for the learned" in text
            assert "Proposals or decoders?" not in text


@pytest.mark.parametrize("gap, says", [
    ("same", "comes from this weaker decoder: prior draws add as much grey through either decoder"),
    ("larger", "Part of their extra blur, compared with Q2's samples, comes from the prior")])
def test_q3b_puts_the_extra_blur_where_the_prior_gap_verdict_does(quick_outputs, tmp_path, gap, says):
    text, _ = q3_report_with(quick_outputs, tmp_path, prior_gap=gap, variety_gap="larger",
                             start_decides=True, aggregate_near_prior=True,
                             control_prior_greyer=True, outside_gap="same")
    assert "Answer. No. Its prior samples" in text and says in text


@pytest.mark.parametrize("gap, controls", [("more", True), ("more", False), ("same", True),
                                           ("fewer", True)])
def test_q3b_says_how_many_prior_draws_land_outside_the_training_latents(quick_outputs, tmp_path, gap,
                                                                       controls):
    """The counts and KLs are the metrics'; the answer box names the count only where more of
    this decoder's prior draws land outside than Q1's, and the paragraph follows the verdict."""
    def edit(lo):
        lo["verdicts"].update(outside_gap=gap, variety_gap="larger", start_decides=True,
                              aggregate_near_prior=True, control_prior_greyer=True)
        if not controls:            # an older run: no sigma_i = 1 control, no narrow start
            del lo["unit_sigma_start"], lo["narrow_from_start"]
    text, lo = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    count = {key: f"{round(lo[key]['outside']['mean'] * lo[key]['draws']):,}"
             for key in ("prior_outside", "amortized_prior_outside")}
    draws = f"{lo['prior_outside']['draws']:,}"
    kl = lo["prior_outside"]["kl_prior_to_latents"]
    assert " ± ".join(build_report.with_se(kl["mean"], kl["se"])).replace("\u2212", "-") in text
    if gap == "more" and controls:   # the answer: the samples, the start's part, the control
        unit = lo["unit_sigma_start"]
        # the verdict rests on where prior draws land, with Q1's encoder's count and KL beside
        assert re.search(rf"Answer\. No\. The learned latents do not fill the prior: .{{1,40}} starts each .{{1,8}} "
                         rf"narrow in about half of its dimensions, and {count['prior_outside']} of "
                         rf"{draws} prior draws end outside, where no training latent's .{{1,8}} "
                         rf"puts much mass \(KL\(.{{1,8}}\) [0-9.,]+ ± [0-9.,]+ nats; Q1's encoder: "
                         rf"{count['amortized_prior_outside']} outside, [0-9.]+ ± [0-9.]+ nats; Evidence, below\)",
                         text), text
        unit_count = round(unit["prior_outside"]["outside"]["mean"] * unit["prior_outside"]["draws"])
        verdicts = lo["verdicts"]
        assert ((f"({unit_count:,} of {draws} outside)" in text)
                is (verdicts["unit_outside_gap"] != "more"))
        ratio = f"{100 * unit['prior_vs_aggregate']['variety_ratio']['ratio']:.0f} %"
        assert f"{ratio} as varied as its training latents'" in text
        assert ("A better start would have helped" in text) is (
            verdicts["unit_variety_gap"] == "smaller" and unit["prior_vs_aggregate"]["variety"]["prior"]["mean"]
            - lo["prior_vs_aggregate"]["variety"]["prior"]["mean"] > 2 * math.hypot(
                unit["prior_vs_aggregate"]["variety"]["prior"]["se"],
                lo["prior_vs_aggregate"]["variety"]["prior"]["se"]))
        start = lo["narrow_from_start"]
        assert (f"starts narrow in {start['at_start']:.0f} of its {lo['latent_dim']} dimensions on "
                f"average, different ones for each image") in text
        new = round((start["at_end"] - start["at_both"]) * lo["train_images"])
        assert ((f"all {start['at_end']:.0f} dimensions per image that end narrow were narrow at "
                 "the start") in text) is (new == 0)
        assert "Evidence. We scored each prior draw" in text and "Where prior draws land." not in text
        assert "Latent optimization from other starts (Q3)." in text
        return
    if gap == "more":     # the answer leads with the count, the body says why and gives the test
        assert re.search(rf"Answer\. No\. Its prior samples .{{1,400}} but the latents do not fill "
                         rf".{{1,12}}: {count['prior_outside']} of {draws} prior draws land where no "
                         r"training latent's", text)
        assert f"For Q1's encoder only {count['amortized_prior_outside']} of {draws} do" in text
        narrow = {k: lo[k]["narrow_dimensions"]["mean"] for k in ("prior_outside",
                                                                   "amortized_prior_outside")}
        assert (f"in {narrow['prior_outside']:.0f} of its {lo['latent_dim']} dimensions on "
                "average") in text
        assert (f"narrow in only {narrow['amortized_prior_outside']:.0f} dimensions" in text
                if round(narrow["amortized_prior_outside"]) else
                "Q1's encoder makes no q narrow in any dimension" in text.replace("𝑞", "q"))
        assert "Why. Each " in text and "Evidence. We scored each prior draw" in text
        assert "Where prior draws land." not in text
        return
    assert (f"For this decoder {count['prior_outside']} of {draws} prior draws land outside, "
            f"for Q1's {count['amortized_prior_outside']};") in text
    opens = re.search(r"Answer\. No\. The learned latents do not fill .{1,12}: although their "
                      r"mean and variance end near the prior's", text)
    assert not opens
    assert {"same": "So prior draws land outside as often through this decoder: gaps",
            "fewer": "So prior draws land outside less often through this decoder: gaps"}[gap] in text
    assert "which we did not test" not in text


def test_the_mid_grey_columns_largest_standard_error_is_in_table_3s_caption(quick_outputs, reports):
    lo = metrics(quick_outputs, "vae_latent_opt")
    ses = [100 * v[d]["se"] for v in (lo["prior_vs_aggregate"], lo["amortized_prior_vs_aggregate"])
           for d in ("aggregate", "prior")] + [100 * lo["real_grey_per_image"]["se"]]
    text = " ".join(reports["ex1"].split())
    assert f"(standard errors at most {build_report.sig(max(ses), 1)} points)" in text


@pytest.mark.parametrize("a, b, points", [(0.9463, 0.8528, "10"), (0.886, 0.672, "22"),
                                          (0.5, 0.5, "0")])
def test_points_between_two_shares_add_up_as_the_percentages_print(a, b, points):
    assert build_report.points_between(a, b) == points
    assert int(points) == round(100 * a) - round(100 * b)


def test_blur_costs_the_digit_that_loses_most_of_its_share():
    per_digit = {"original_images": {"0": 0.99, "1": 1.0, "8": 0.886, "9": 0.93},
                 "blurred_test_images": {"0": 0.97, "1": 1.0, "8": 0.672, "9": 0.76}}
    p = {k: {"nearest_digit": {"per_digit": {d: {"kept": s} for d, s in v.items()}}}
         for k, v in per_digit.items()}
    assert build_report.max_blur_cost(p) == {"digit": "8", "points": "22"}


@pytest.mark.parametrize("keeps", [True, False])
def test_the_labs_blur_control_is_named_with_its_errors(quick_outputs, tmp_path, keeps):
    """The blurred copies' mean error and the largest per-digit gap to PCA's are the metrics';
    an older run's single box is still named by its size."""
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "ppca_pca" / "metrics.json"
    p = json.loads(path.read_text())
    p["answers"]["namer_keeps_blurred_digits"] = keeps
    path.write_text(json.dumps(p))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "apml_lab_report.pdf").split())
    blur, pca = p["blurred_test_images"], p["pca"]
    gap = max(abs(blur["test_sq_error_per_digit"][d] - pca["test_sq_error_per_digit"][d])
              for d in map(str, range(10)))
    assert (f"blurred by the box filter whose squared error is nearest its PCA reconstruction's "
            f"({blur['test_sq_error']:.1f} against {pca['test_sq_error']:.1f} on average, and "
            f"within {gap:.1f} of PCA's for every digit)") in text
    assert ("So blur alone does not explain PCA's losses" in text) is keeps
    assert ("so a digit PCA loses may only be blurred" in text) is not keeps
    # an older run: one 9 x 9 box for every image, its mean error stored
    for key in ("box_counts", "test_sq_error_per_digit", "beyond_every_box"):
        del blur[key]
    blur.update(box=9, sq_error=46.0)
    path.write_text(json.dumps(p))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "apml_lab_report.pdf").split())
    assert re.search(r"blurred by a 9.{1,8}9 box filter, a rough stand-in for PCA's blur, chosen "
                     rf"for a squared error near PCA's \(46.0 against {pca['test_sq_error']:.1f}\)", text)


def test_the_blur_controls_per_digit_gap_is_the_largest_over_the_ten_digits():
    pca = {"test_sq_error_per_digit": {str(d): 40.0 + d for d in range(10)}}
    blurred = {"box_counts": {"9": 10, "27": 3}, "test_sq_error": 44.71, "beyond_every_box": 1234,
               "test_sq_error_per_digit": {str(d): 40.0 + d + (0.36 if d == 4 else -0.1)
                                           for d in range(10)}}
    assert build_report.blur_control(blurred, pca) == {"per_image": True, "error": "44.7",
                                                       "digit_gap": "0.4"}
    assert build_report.blur_control({"nearest_digit": {}}, pca) == {"per_image": False, "box": 5,
                                                                    "error": None}


def test_the_lab_says_what_blur_costs_and_what_the_noise_variances_leave(quick_outputs, reports):
    p = metrics(quick_outputs, "ppca_pca")
    text = " ".join(reports["lab"].split()).replace("\u2212", "-")
    original = p["original_images"]["nearest_digit"]["kept"]
    blurred = p["blurred_test_images"]["nearest_digit"]["kept"]
    if p["answers"]["namer_keeps_blurred_digits"]:
        assert f"Blur costs the rule {round(100 * original) - round(100 * blurred)} points" in text


@pytest.mark.parametrize("pca, ppca, says", [
    ([[4, 9, 9], [5, 8, 8], [2, 3, 3]], None,
     "Decoded by PCA, each of the three closest pairs comes out as one digit (4 and 9 as a 9; "
     "5 and 8 as an 8; 2 and 3 as a 3; the mean rows of Figure 1; of all 45 pairs of digits, "
     "6 do), for PPCA too."),
    ([[5, 8, 8]], [], "Decoded by PCA, one of the three closest pairs comes out as one digit (5 and 8 "
                      "as an 8; the mean rows of Figure 1; of all 45 pairs of digits, 6 do)."),
    ([], [], "Decoded by PCA, none of the three closest pairs comes out as one digit.")])
def test_q47_says_which_close_pairs_decoding_merges(quick_outputs, tmp_path, pca, ppca, says):
    text, _ = report_with(quick_outputs, tmp_path, "ppca_pca", lambda p: p["answers"].update(
        pairs_decoded_as_one={"pca": pca, "ppca": pca if ppca is None else ppca},
        pairs_decoded_as_one_of_all={"pca": 6, "ppca": 6}), "apml_lab_report.pdf")
    # the comparison with Q4.1 and Q4.5 closes the bold answer; the decoding follows it
    # then the closest pairs' distances, each pair with its own (test_q47_gives_the_closest_pairs...)
    assert re.search(r"Compared with Q4\.1 and Q4\.5, PCA keeps [a-z ]+ and [a-z ]+\. The groups "
                     r"chain together digits whose mean codes lie close and stop at the largest jump "
                     r"in distance \(single-linkage clustering\)\. In units of "
                     r"the mean distance between digit means, the closest pairs lie .+? for PPCA\. "
                     + re.escape(says), text)


def test_q47_gives_the_closest_pairs_distances_from_the_metrics(quick_outputs, reports):
    """Q4.7's closest pairs can be checked: each with its distance relative to the mean distance
    between digit means, as the metrics give them, for PCA and for PPCA."""
    enc = metrics(quick_outputs, "ppca_pca")["encodings"]
    said = {k: ", ".join(f"{'–'.join(map(str, q['digits']))} ({q['relative']:.2f})"
                         for q in enc[k]["closest_pairs"][:3]) for k in ("pca", "ppca")}
    text = " ".join(reports["lab"].split())
    assert f"the closest pairs lie {said['pca']} apart for PCA and {said['ppca']} for PPCA." in text
    # Q4.8: where the VAE separates digits better, the pairs it still does not separate
    vae = ", ".join(f"{'–'.join(map(str, q['digits']))} ({q['relative']:.2f})"
                    for q in enc["vae"]["closest_pairs"][:3])
    separates = json.loads((quick_outputs / "report" / "apml_lab_values.json").read_text())[
        "vae_separates_better"]
    assert (f"Not every digit gets its own region: its closest mean codes are {vae} apart (units as "
            "in Q4.7)" in text) is separates


def test_q2_gives_the_samples_variety_against_real_and_blurred_images(quick_outputs, reports):
    """Q2 without the classifier: the variety at the first and last snapshot, of real test
    images and of blurred ones, as Table 1 prints them, and the last as a share of the real."""
    a = metrics(quick_outputs, "vae_amortized")
    epochs, variety = a["snapshot_epochs"], a["prior_variety"]
    first, last = (variety[str(e)]["mean"] for e in (epochs[0], epochs[-1]))
    ref = {k: v["mean"] for k, v in a["variety_references"].items()}
    moves = "rises" if last > first else "falls"
    assert (f"the samples' variety (Table 1; 0 when all are alike) {moves} from {first:.3f} at "
            f"epoch {epochs[0]} to {last:.3f} at epoch {epochs[-1]} (real test images: "
            f"{ref['real test images']:.3f}). Variety is not quality: noise scores highest "
            f"({ref['gaussian noise']:.3f})") in reports["ex1"]
    assert (f"their variety is {100 * last / ref['real test images']:.0f} % of real images' "
            f"(blurred test images: {ref['blurred test images']:.3f})") in reports["ex1"]
    assert "References. Doersch, C. (2016)" in reports["lab"]


@pytest.mark.parametrize("greyer", [True, False])
def test_q2_calls_the_samples_blurred_only_where_they_are_greyer_than_real_images(
        quick_outputs, tmp_path, greyer):
    """'Still blurry' and 'but blurred' need Q1's prior draws to have clearly more mid-grey
    pixels than real test images (Table 3's measure of blur), by two standard errors."""
    def edit(lo):
        real = lo["real_grey_per_image"]
        lo["amortized_prior_vs_aggregate"]["prior"].update(
            share=real["mean"] + (0.1 if greyer else 0.0), se=real["se"])
    text, _ = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    assert ("different latents give different, still blurry, digit-like shapes" in text) is greyer
    assert bool(re.search(r"are digit-like but blurred \(mid- ?grey pixels in Table 3\)", text)) is greyer


def test_q2_does_not_say_the_samples_separate_when_their_variety_falls(quick_outputs, tmp_path):
    def falls(a):
        epochs = [str(e) for e in a["snapshot_epochs"]]
        a["prior_variety"][epochs[-1]]["mean"] = a["prior_variety"][epochs[0]]["mean"] / 2
    text, _ = report_with(quick_outputs, tmp_path, "vae_amortized", falls)
    assert "Over the epochs they do not become more varied (Figure 4, Table 1)." in text
    assert "Over the epochs they separate" not in text


def test_table_1_is_each_sets_variety_from_the_metrics(quick_outputs):
    """Table 1: every snapshot's prior samples, Q3's final generator's, real test images and the
    two non-digit sets, each row its metrics' mean variety; no classifier column."""
    a, lo = metrics(quick_outputs, "vae_amortized"), metrics(quick_outputs, "vae_latent_opt")
    values = json.loads((quick_outputs / "report" / "ex1_values.json").read_text())["q2"]
    ref = a["variety_references"]
    expected = ([(f"amortized, epoch {e}", a["prior_variety"][str(e)]) for e in a["snapshot_epochs"]]
                + [("latent optimization, final", lo["prior_vs_aggregate"]["variety"]["prior"]),
                   ("real test images", ref["real test images"]),
                   ("Gaussian noise", ref["gaussian noise"]),
                   ("blurred test images", ref["blurred test images"])])
    assert [(r["name"], r["variety"]) for r in values["rows"]] == [
        (name, f"{v['mean']:.3f}") for name, v in expected]
    assert set(values["rows"][0]) == {"name", "variety", "variety_se"}


@pytest.mark.parametrize("of_real, says", [(0.09, "every latent decodes to nearly the same grey blob"),
                                           (0.11, "the samples are blurred shapes")])
def test_q2_calls_the_first_samples_alike_below_a_tenth_of_real_images_variety(
        quick_outputs, tmp_path, of_real, says):
    def alike(a):
        real = a["variety_references"]["real test images"]["mean"]
        a["prior_variety"][str(a["snapshot_epochs"][0])]["mean"] = of_real * real
    text, _ = report_with(quick_outputs, tmp_path, "vae_amortized", alike)
    assert f"At epoch 1 {says}." in text


@pytest.mark.parametrize("a, b, figures", [(0.05609594949, 0.05609580519, 7), (0.0561, 0.0561, 4),
                                            (0.05, 0.04, 4), (1.0, 1.0001, 6)])
def test_two_near_equal_values_print_to_the_figures_that_tell_them_apart(a, b, figures):
    n = build_report.figures_apart(a, b)
    assert n == figures
    if a != b:                  # printed apart, and their printed relative gap is the true one
        pa, pb = (float(build_report.sig(v, n)) for v in (a, b))
        assert pa != pb and abs(pa - pb) / a == pytest.approx(abs(a - b) / a, rel=0.5)


def test_the_labs_ppca_fits_print_sigma2_to_the_figures_that_differ(quick_outputs, reports):
    p = metrics(quick_outputs, "ppca_pca")
    g, c = p["ppca_gradient"]["sigma2"], p["ppca_closed_form"]["sigma2"]
    n = build_report.figures_apart(g, c)
    assert f"is {build_report.sig(g, n)} against {build_report.sig(c, n)} (" in reports["lab"]


@pytest.mark.parametrize("p_value, link", [(0.01, True), (0.5, False)])
def test_q47_says_when_no_test_links_crowding_and_loss(quick_outputs, tmp_path, p_value, link):
    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "ppca_pca" / "metrics.json"
    p = json.loads(path.read_text())
    p["answers"].update(pca_apart_kept_p=p_value, pca_lost_to_nearest_p=0.5, pca_crowding_p=0.5)
    path.write_text(json.dumps(p))
    build(copy)
    text = " ".join(pdf_text(copy / "report" / "apml_lab_report.pdf").split())
    # the claim about the error and crowding always carries its statistic; no link found: one
    # clause says so, with Fisher's p in brackets; a link found: the caution that ten digits make
    # any test weak, with Fisher's p
    assert "against the distance to the nearest other mean code)" in text
    assert ("the data are too few to show whether crowded digits are kept less often (" in text) \
        is not link
    assert ("With only ten digits, no test of these links is strong; Fisher" in text) is link
    paired = p["ppca_comparison"]["ppca_minus_pca_sq_error"]
    decimals = build_report.se_decimals(paired["se"])
    assert (f"On the same images, PPCA's error (gradient fit) differs from PCA's by only "
            f"{paired['mean']:+.{decimals}f} ± {paired['se']:.{decimals}f}").replace("-", "−") in text


def q410_text(quick_outputs, tmp_path, s_vae, s_ppca, test_elbo):
    """The lab report's text with the VAE's and PPCA's noise variances and the VAE's test ELBO
    set (PPCA's test log-likelihood 14.36), the VAE the better density, and the lead's other
    terms (PPCA's wider directions 4.36, the KL -8.87, the misfits' difference the rest)."""
    def edit(p):
        p["vae"].update(sigma2=s_vae, test_elbo=test_elbo, test_elbo_se=2.14)
        p["ppca_closed_form"].update(sigma2=s_ppca, test_log_likelihood=14.36)
        noise = 392 * math.log(s_ppca / s_vae)
        misfit = test_elbo - 14.36 - noise - 4.36 + 8.87
        p["answers"].update(vae_better_density=True, noise_variance_nats=noise, elbo_lead_terms={
            "noise_variance": noise, "ppca_principal_directions": 4.36, "kl": -8.87,
            "misfit": misfit, "ppca_misfit": 390.0, "vae_misfit": 390.0 - misfit})
    return report_with(quick_outputs, tmp_path, "ppca_pca", edit, "apml_lab_report.pdf")[0]


@pytest.mark.parametrize("s_vae, s_ppca, test_elbo, verb", [
    (0.041053175926, 0.056095805186, 147.1, "adding"),      # a 5-epoch run's (misfit +15.4)
    (0.03565, 0.05610, 174.0, "taking back")])              # a 15-epoch run's (-13.6)
def test_q410_splits_the_density_gap_into_terms_that_sum_to_it(quick_outputs, tmp_path, s_vae,
                                                               s_ppca, test_elbo, verb):
    """Q4.10's nats from the noise variances, D/2 log(sigma2_PPCA / sigma2_VAE), recomputed from
    the printed variances, give the printed nats (with three figures, 0.0561 and 0.0411, they
    came out 0.7 nats off); with the other three printed terms they sum to the printed lead."""
    text = q410_text(quick_outputs, tmp_path, s_vae, s_ppca, test_elbo)
    found = re.search(r"Of the ELBO.s lead, about ([\d.]+) nats, the VAE.s smaller fitted noise variance "
                      r"\(.{1,8}=\s*([\d.]+) against ([\d.]+)\) alone would give about (\d+):.*?"
                      r"PPCA.s two wider principal directions cost it (\d+) more.*?the VAE.s KL "
                      r"term takes back (\d+),.*?is (\d+) (larger|smaller) than PPCA.s.*?"
                      rf"{verb} (\d+)\.", text)
    assert found, "Q4.10's split of the gap"
    # the ELBO with its standard error, and the lead to the same precision
    assert f"is {round(test_elbo)} ± 2 nats per image, against the exact 14.360" in text
    gap, vae, ppca, noise, wider, kl, misfit_printed, which, again = found.groups()
    gap, vae, ppca, noise, wider, kl, printed = map(float, (gap, vae, ppca, noise, wider, kl,
                                                             misfit_printed))
    assert (vae, ppca) == (round(s_vae, 5), round(s_ppca, 5))
    assert round(392 * math.log(ppca / vae)) == noise
    assert which == ("smaller" if verb == "adding" else "larger") and float(again) == printed
    signed = printed if verb == "adding" else -printed
    assert abs(noise + wider - kl + signed - gap) <= 2.6     # five rounded, each within 0.5


@pytest.mark.parametrize("improved, says", [(10, True), (9, False)])
def test_q49_names_the_naming_rules_bias_where_the_squared_error_backs_the_vae(
        quick_outputs, tmp_path, improved, says):
    text, _ = report_with(quick_outputs, tmp_path, "ppca_pca",
                          lambda p: p["answers"].update(vae_improved_digits=improved),
                          "apml_lab_report.pdf")
    assert ("The naming rule favours sharp images such as the VAE's (Q4.1), but the squared "
            "error, which if anything favours blurred ones, also favours the VAE for every "
            "digit." in text) is says


@pytest.mark.parametrize("lo_prior, words", [(0.0373, "less varied than"),
                                             (0.0870, "about as varied as"),
                                             (0.1200, "more varied than")])
def test_q3b_compares_its_samples_with_q2s_by_their_variety(quick_outputs, tmp_path, lo_prior,
                                                            words):
    """Q3 (b) asks for a comparison with Q2's samples: the answer opens with it, this decoder's
    prior draws against Q1's (0.0875 ± 0.0016 here), tied within two standard errors."""
    def edit(lo):
        lo["verdicts"].update(variety_gap="larger", start_decides=True, aggregate_near_prior=True,
                              control_prior_greyer=True, outside_gap="same")
        lo["prior_vs_aggregate"]["variety"]["prior"].update(mean=lo_prior, se=0.0006)
        lo["amortized_prior_vs_aggregate"]["variety"]["prior"].update(mean=0.0875, se=0.0016)
    text, _ = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    assert f"Answer. No. Its prior samples (Figure 6, bottom) are {words} Q2's (top; variety" in text
    assert ("partly through this decoder's own blur" in text) is (words == "less varied than")


@pytest.mark.parametrize("lo_grey, words", [(0.320, "and greyer (32.0 against 27.2 % mid-grey"),
                                            (0.274, None),
                                            (0.240, "and less grey (24.0 against 27.2 % mid-grey")])
def test_q3b_compares_its_samples_with_q2s_by_their_blur_beyond_two_standard_errors(
        quick_outputs, tmp_path, lo_grey, words):
    """Where the start explains the answer (both control runs), Q3 (b) also compares the prior
    draws' mid-grey shares through either decoder (Table 3's column): named only where they
    differ by more than two standard errors (0.274 against 0.272 ± 0.002 does not)."""
    def edit(lo):
        lo["verdicts"].update(outside_gap="more", variety_gap="larger", start_decides=True,
                              aggregate_near_prior=True)
        lo["prior_vs_aggregate"]["prior"].update(share=lo_grey, se=0.002)
        lo["amortized_prior_vs_aggregate"]["prior"].update(share=0.272, se=0.002)
    text, lo = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    assert "unit_sigma_start" in lo and "narrow_from_start" in lo     # the branch in question
    assert "Q2's (Figure 6 shows ten of each)" in text if words is None else words in text


@pytest.mark.parametrize("part, whole, share", [
    (0.0157, 0.0286, "more than half"), (0.0141, 0.029, "about half"),
    (0.0126, 0.029, "less than half"), (0.02, 0.029, "about two thirds"),
    (0.009, 0.029, "about a third"), (0.002, 0.029, "little"), (0.028, 0.029, "nearly all"),
    (0.035, 0.029, None), (-0.002, 0.029, None), (0.0, 0.0, None)])
def test_a_share_is_given_only_where_the_part_is_one(part, whole, share):
    """Shares known exactly: 0.55 is 'more than half' (beyond 4 points), 0.49 'about half'."""
    assert build_report.share_of(part, whole) == share


@pytest.mark.parametrize("part_se, says", [(0.0037, "about half"), (0.0005, "more than half")])
def test_a_share_says_more_than_only_beyond_two_of_its_standard_errors(part_se, says):
    """Q3 (a): the decoders' part of the raw gap, 0.0168 ± 0.0037 of 0.0291 ± 0.0033: a share
    of 0.58 ± 0.14 (delta method) is 'about half'; with a ten times smaller error on both it is
    0.58 ± 0.02, 'more than half'."""
    whole_se = 0.0033 if part_se > 0.001 else 0.0003
    assert build_report.share_of(0.0168, 0.0291, part_se, whole_se) == says


@pytest.mark.parametrize("eq9_order, says", [
    (list(range(10)), "Eq. 9 ranks all ten digits in the same order"),
    ([0, 1, 2, 3, 5, 4, 6, 7, 8, 9], "Eq. 9 names the same two digits, but ranks 4 and 5 differently")])
def test_q4_says_whether_eq9_reorders_the_digits_between_its_ends(quick_outputs, tmp_path,
                                                                  eq9_order, says):
    """Laplace ranks the digits 0 (most likely) to 9; Eq. 9 ranks them the same way or swaps two
    in the middle: the text follows the per-digit means, not a fixed sentence."""
    def edit(ll):
        for rank, d in enumerate(range(10)):
            ll["per_digit"][str(d)]["mean"] = -100.0 - 10 * rank
        for rank, d in enumerate(eq9_order):
            ll["per_digit"][str(d)]["eq9_mean"] = -110.0 - 10 * rank
        ll["agreement"].update(most=True, least=True)
    text, _ = report_with(quick_outputs, tmp_path, "log_likelihood", edit)
    assert says in text
    assert "The order in between changes" not in text


def test_digits_moved_in_a_ranking_are_those_at_another_place():
    per = {str(d): {"a": -d, "b": -d} for d in range(10)}
    assert build_report.moved_in_ranking(per, "a", "b") == []
    per["4"]["b"], per["5"]["b"] = -5.5, -3.5       # 5 now ahead of 4
    assert build_report.moved_in_ranking(per, "a", "b") == [4, 5]


def test_the_lab_says_which_digits_each_method_decodes_from_their_mean_codes(quick_outputs,
                                                                             reports):
    """4.1, 4.5, 4.9 ask what is 'decoded' well too: the digits whose mean code decodes to an
    image named as themselves, per method, as the metrics give them."""
    decoded = metrics(quick_outputs, "ppca_pca")["decoded_mean_codes"]
    text = " ".join(reports["lab"].split())
    for method, name in (("pca", "PCA"), ("vae", "the VAE")):
        own = decoded[method]["own"]
        ending = {0: "for no digit.", 10: "for all ten."}.get(
            len(own), f"for {build_report.digit_list(own)} only." if own else "")
        assert (f"Decoded from each digit's mean code (the mean rows of Figure 1), {name} gives an "
                f"image named as that digit {ending}") in text
    same = decoded["ppca"]["own"] == decoded["pca"]["own"]
    assert ("Its mean codes decode to the same digits as PCA's (Figure 1)." in text) is same


def test_q41_splits_the_digits_pca_loses_by_the_blur_control(quick_outputs, tmp_path):
    """Where blur alone defeats the naming rule, Q4.1 says digit by digit which lost digits PCA
    keeps measurably less often than blur does (lost beyond blur) and which it does not."""
    def edit(p):
        p["answers"].update(namer_keeps_blurred_digits=False, pca_lost_beyond_blur=[2, 6],
                            pca_lost_as_blur=[3, 4, 5, 7, 8])
    text, _ = report_with(quick_outputs, tmp_path, "ppca_pca", edit, "apml_lab_report.pdf")
    assert ("PCA keeps measurably fewer images than blur alone for 2 and 6, and about as many as "
            "blur alone, or more, for 3, 4, 5, 7 and 8.") in text
    # ... in the checks on the rule, after the questions; the answer stays plain
    assert text.index("Additional findings: checks on the naming rule (Q4.1).") < text.index(
        "PCA keeps measurably fewer images than blur alone")
    # the answer stays plain; the paragraph on how we judge gives the caveat, the checks follow
    answer = text[text.index("Q4.1:"):text.index("How we judge.")]
    judge = text[text.index("How we judge."):text.index("By squared error.")]
    assert "may only be blurred" not in answer
    assert "The rule has biases: blur alone fools it" in judge and "may only be blurred" in judge


@pytest.mark.parametrize("stored", [True, False])
def test_q41_controls_the_naming_rules_favourites_by_their_false_alarms(quick_outputs, tmp_path,
                                                                        stored):
    """Q4.1 names how many of the images the rule names as its favourite digits show them, and
    ranks the digits by share kept minus false alarms, in points, with the largest of the rest;
    a run that stored no false alarms keeps the caution alone."""
    score = {"0": 0.78, "1": 0.86, "9": 0.43, "8": 0.17, **{d: 0.05 for d in "234567"}}

    def edit(p):
        per = p["pca"]["nearest_digit"]["per_digit"]
        for d in map(str, range(10)):
            per[d].update(kept=0.9 if d in "019" else 0.2, named_most=0 if d in "2568" else 9)
            per[d]["precision"] = {"0": 0.43, "9": 0.33}.get(d, 0.5)
        p["answers"]["lost"]["pca"] = {d: per[d]["named_most"] for d in "2345678"}
        p["answers"]["kept_order"]["pca"] = list("0912345678")
        p["answers"].update(beyond_false_alarms={k: score for k in ("pca", "ppca_gradient", "vae")},
                            beyond_false_alarms_best={"pca": ["1", "0", "9"]},
                            beyond_false_alarms_ties={"pca": []})
        if not stored:
            for k in ("beyond_false_alarms", "beyond_false_alarms_best", "beyond_false_alarms_ties"):
                del p["answers"][k]
            for d in per:
                del per[d]["precision"]
    text, _ = report_with(quick_outputs, tmp_path, "ppca_pca", edit, "apml_lab_report.pdf")
    control = ("0 for a rule that guesses) ranks 1, 0 and 9 best (by 86, 78 and 43 percentage "
               "points; at most 17 for any other digit), the digits PCA keeps.")
    assert (control in text) is stored
    assert ("so blends are named after a few digits, here 0 and 9: of the reconstructions named as "
            "these, only 43 and 33 % show that digit." in text) is stored
    assert ("here 0 and 9, whose shares kept may be too high." in text) is not stored
    # the headline gives the digits' shares kept, so that a weaker third (here 9) shows
    assert re.search(r"PCA reconstructs digits [0-9, and]+ (well|only partly)( and [0-9, and]+ only "
                     r"partly)?: [0-9, and]+ % of their "
                     r"reconstructions still lie nearest to a training image of the same digit\.",
                     text)


def test_q46_opens_with_the_paired_difference_not_the_rounded_means(quick_outputs, reports):
    """Q4.6's answer is the paired per-image difference with its standard error; the rounded
    means, whose last digits may differ by rounding alone, come after it."""
    p = metrics(quick_outputs, "ppca_pca")
    paired = p["ppca_comparison"]["ppca_minus_pca_sq_error"]
    mean, se = build_report.with_se(paired["mean"], paired["se"], sign=True)
    larger = "slightly larger than" if p["answers"]["ppca_error_not_below_pca"] else "no larger than"
    ppca, pca = (" ± ".join(build_report.with_se(p[k]["test_sq_error"], p[k]["test_sq_error_se"]))
                 for k in ("ppca_gradient", "pca"))
    text = " ".join(reports["lab"].split())
    assert (f"Q4.6: PPCA's test squared error, {ppca}, is {larger} PCA's {pca}: paired on the same "
            f"images, PPCA's error minus PCA's is {mean} ± {se} per image (closed form "
            f"{p['ppca_closed_form']['test_sq_error']:.2f}; Table 1)").replace(
                "\u2212", "-") in text             # pdf_text writes Typst's minus as '-'


@pytest.mark.parametrize("shares, says", [
    ({"1": 0.99, "0": 0.91, "9": 0.56}, "1 and 0 well and 9 only partly"),
    ({"1": 0.99, "0": 2 / 3}, "1 and 0 well"),          # two thirds exactly is well
    ({"9": 0.66, "4": 0.51}, "9 and 4 only partly"), ({}, "")])
def test_kept_digits_are_kept_well_from_two_thirds_of_their_images(shares, says):
    """Q4.1 and Q4.5 say how well each kept digit is kept: 'well' from two thirds of its images,
    'only partly' between half and two thirds, in the order given (most kept first)."""
    per = {d: {"kept": s} for d, s in shares.items()}
    assert build_report.kept_phrase(per, list(shares)) == says


@pytest.mark.parametrize("ends, says", [
    ([-10.47, -0.15, 0.87, 0.44], {"n": 4, "below": 2, "below_max": "10.5", "above": 2, "above_max": "0.9"}),
    ([-3.0, -1.0], {"n": 2, "below": 2, "below_max": "3.0", "above": 0, "above_max": "0"}),
    ([0.04, 2.0], {"n": 2, "below": 0, "below_max": "0", "above": 2, "above_max": "2.0"}),
    ([-0.04, 0.3], {"n": 2, "below": 1, "below_max": "0.04", "above": 1, "above_max": "0.3"})])
def test_figure_9s_caption_counts_where_eq9_ends_against_the_laplace_estimate(ends, says):
    """At the largest M, each image's Eq. 9 minus its Laplace estimate (the curves' last
    points): how many lie below and above 0, and by how much at most, against numpy."""
    rng = np.random.default_rng(0)
    laplace = [list(rng.normal(-300, 50, 3)) for _ in ends]
    eq9 = [list(rng.normal(-320, 50, 2)) + [lap[-1] + e] for lap, e in zip(laplace, ends)]
    diff = np.array([e[-1] - lap[-1] for e, lap in zip(eq9, laplace)])
    assert build_report.eq9_at_largest_m({"eq9": eq9, "laplace": laplace}) == says
    assert (diff < 0).sum() == says["below"] and (diff > 0).sum() == says["above"]


@pytest.mark.parametrize("lost, named, says", [
    ({"4": 9, "5": 5}, {4: 9, 5: 3}, {"digits": "4 and 5", "as": "a 9 and a 3", "one": False}),
    ({"8": 3}, {8: 8}, None),                   # its mean code still decodes to itself
    ({"8": 3, "2": 1}, {8: 1, 2: 2}, {"digits": "8", "as": "a 1", "one": True}),
    ({}, {}, None)])
def test_q49_names_the_lost_digits_whose_mean_code_decodes_to_another(lost, named, says):
    """Q4.9 ties the VAE's lost digits to Figure 1's mean rows: those whose mean code decodes to another
    digit, in digit order, with what they decode to."""
    names = [named.get(d, d) for d in range(10)]
    p = {"answers": {"lost": {"vae": lost}},
         "decoded_mean_codes": {"vae": {"named": names, "own": [d for d in range(10) if names[d] == d]}}}
    assert build_report.decoded_values(p)["vae_lost_codes"] == says


@pytest.mark.parametrize("share, n", [(0.5, 400), (0.9953, 10_000), (0.029, 1_000), (0.0, 10)])
def test_a_binomial_standard_error_is_scipys(share, n):
    """sqrt(p (1 - p) / n), the standard error of a share of n images (Part 1's accuracy, the
    lab's shares kept), against scipy's binomial distribution."""
    assert build_report.binomial_se(share, n) == pytest.approx(scipy.stats.binom(n, share).std() / n,
                                                               abs=1e-15)


@pytest.mark.parametrize("kept, borderline", [(0.49, "5"), (0.515, "5"), (0.45, ""), (0.56, "")])
def test_a_share_kept_within_two_standard_errors_of_half_is_borderline(kept, borderline):
    """892 images: a share's binomial standard error is about 1.7 points, so 49 % and 51.5 %
    lie within two of the half that decides kept or lost, 45 % and 56 % do not."""
    per = {str(d): {"kept": 0.9, "named_most": d, "images": 892} for d in range(10)}
    per["5"].update(kept=kept, named_most=3 if kept < 0.5 else 5)
    lost = {"5": per["5"]["named_most"]} if kept < 0.5 else {}
    values = build_report.survival({"kept": 0.8, "per_digit": per}, lost, [str(d) for d in range(10)])
    se = math.sqrt(kept * (1 - kept) / 892)
    assert (abs(kept - 0.5) < 2 * se) is bool(borderline)      # the oracle's side of the line
    assert values["borderline"] == borderline
    assert values["borderline_shares"] == (f"{round(100 * kept)}" if borderline else "")
    # runs that stored no image counts name no borderline digit
    for v in per.values():
        del v["images"]
    assert build_report.survival({"kept": 0.8, "per_digit": per}, lost,
                                 [str(d) for d in range(10)])["borderline"] == ""


def test_q49_calls_a_lost_digit_near_half_borderline(quick_outputs, tmp_path):
    def edit(p):
        per = p["vae"]["nearest_digit"]["per_digit"]
        for d in per:
            per[d].update(kept=0.9, named_most=int(d), images=1000)
        per["5"].update(kept=0.49, named_most=3)
        per["4"].update(kept=0.38, named_most=9)
        p["answers"]["lost"]["vae"] = {"5": 3, "4": 9}
    text, _ = report_with(quick_outputs, tmp_path, "ppca_pca", edit, "apml_lab_report.pdf")
    assert ("of another digit (Q4.1; 5 only just: 49 % kept, within two standard errors of half "
            "in this one training run)") in text
    # the bold verdict calls only the clearly lost digit challenging
    assert re.search(r"Q4\.9: Digit 4 is challenging for the VAE, and 5 on the edge: more than half", text)
    assert "Digits 4 and 5 are challenging" not in text and "Digits 5 and 4 are" not in text


@pytest.mark.parametrize("five, says", [(0.56, True), (2 / 3, False)])
def test_q49_names_a_digit_the_vae_keeps_only_partly(quick_outputs, tmp_path, five, says):
    """Grader 159: Q4.9 named only the lost 4, while the VAE kept 5 at 56 %, the share Q4.1
    calls 'only partly' for PCA; below two thirds the answer says so, with the share."""
    def edit(p):
        per = p["vae"]["nearest_digit"]["per_digit"]
        for d in per:
            per[d].update(kept=0.9, named_most=int(d), images=1000)
        per["5"].update(kept=five)
        per["4"].update(kept=0.3, named_most=9)
        p["answers"]["lost"]["vae"] = {"4": 9}
    text, _ = report_with(quick_outputs, tmp_path, "ppca_pca", edit, "apml_lab_report.pdf")
    assert "It keeps most images of the other nine" in text
    assert ("other nine (5 only partly: 56 % kept), where PPCA" in text) is says
    assert ("only partly:" in text.split("Q4.9:")[1].split("In all")[0]) is says


@pytest.mark.parametrize("mean, in_any, says", [
    (3.0, 3, "narrow in only 3 dimensions, the same for every image, and keeps it close"),
    (3.4, 7, "narrow in only 3.4 dimensions on average, and keeps it close"),
    (2.6, 3, "narrow in only 2.6 dimensions on average, and keeps it close"),
    (0.4, 2, "narrow in only 0.4 dimensions on average, and keeps it close"),
    (0.0, 0, "makes no q narrow in any dimension and keeps it close")])
def test_q3b_says_in_how_many_dimensions_q1s_encoder_is_narrow(quick_outputs, tmp_path, mean,
                                                               in_any, says):
    """Q3 (b)'s 'Why': 'the same for every image' only where the dimensions narrow in any image
    are as many as those narrow in each; none narrow is said in words."""
    def edit(lo):
        lo["verdicts"].update(outside_gap="more", variety_gap="larger", start_decides=True)
        lo["amortized_prior_outside"]["narrow_dimensions"]["mean"] = mean
        lo["amortized_prior_outside"]["narrow_in_any_image"] = in_any
    text, lo = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    assert says in text.replace("𝑞", "q")
    # Q1 names the same few dimensions where it explains why the VAE does not overfit
    q1 = "q is narrow, with variance below 0.5, in only 3 of the"
    assert (q1 in text.replace("𝑞", "q")) is ("the same for every image" in says)


@pytest.mark.parametrize("variety, more_varied, outside, says", [
    ("same", False, "fewer", "But a better start alone would not have been enough: with every"),
    ("larger", False, "same", "and prior draws fall even further short"),
    ("smaller", True, "same", "A better start would have helped: with every"),
    ("smaller", False, "same", "yet prior draws still decode to images only"),
    ("same", False, "more", "A better start alone would not have been enough either: with every")])
def test_q3bs_answer_follows_the_control_started_at_unit_sigma(quick_outputs, tmp_path, variety,
                                                                more_varied, outside, says):
    """The sigma_i = 1 control's verdicts decide the answer's last sentence: 'helped' only where
    its prior draws fall short less than Q3's and are more varied in themselves."""
    def edit(lo):
        lo["verdicts"].update(outside_gap="more", variety_gap="larger", start_decides=True,
                              aggregate_near_prior=True, unit_variety_gap=variety,
                              unit_outside_gap=outside)
        prior = lo["unit_sigma_start"]["prior_vs_aggregate"]["variety"]["prior"]
        q3 = lo["prior_vs_aggregate"]["variety"]["prior"]
        prior.update(mean=q3["mean"] * (2 if more_varied else 0.5), se=q3["se"])
    text, lo = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    assert says in text
    assert ("still land outside" in text) is (outside == "more")
    # said once, in the answer: the 'Why' paragraph does not repeat the control
    assert text.count("with every σ") + text.count("with every 𝜎") == 1


@pytest.mark.parametrize("lo_share, says", [(0.63, True), (0.84, False)])
def test_q3b_gives_the_encoders_order_only_where_the_latents_carry_less(quick_outputs, tmp_path,
                                                                       lo_share, says):
    """The 'likely reason' (an encoder orders the latents) is printed only where the learned
    latents name digits measurably less often than Q1's encoder's (0.85 ± 0.005): two standard
    errors of the difference."""
    def edit(lo):
        lo["verdicts"].update(outside_gap="more", variety_gap="larger", start_decides=True,
                              aggregate_near_prior=True, unit_variety_gap="same",
                              unit_outside_gap="fewer")
        lo["digit_order"].update(mean=lo_share, se=0.007)
        lo["amortized_digit_order"].update(mean=0.85, se=0.005)
    text, lo = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    sentence = ("names an image's digit for 85 % of the training images with Q1's encoder, "
                f"{100 * lo_share:.0f} % with the learned")
    assert (sentence in text) is says
    # in the answer, after the start's part, as what remains
    assert re.search(r"training latents'?\.\s*What remains is likely order: an encoder", text.replace("’", "'")) \
        if says else "What remains is likely order" not in text


@pytest.mark.parametrize("new_per_image, says", [
    (0, "all 7 dimensions per image that end narrow were narrow at the start"),
    ("two", "the 7 dimensions per image that end narrow were narrow at the start, all but two "
            "dimensions in all"),
    (2, "of the 7 dimensions per image that end narrow, 5 were narrow at the start")])
def test_q3b_says_how_many_narrow_dimensions_the_start_left(quick_outputs, tmp_path,
                                                           new_per_image, says):
    """All, all but a few (counted over the images, where the means round alike), or how many."""
    def edit(lo):
        lo["verdicts"].update(outside_gap="more", variety_gap="larger", start_decides=True,
                              aggregate_near_prior=True)
        new = 2 / lo["train_images"] if new_per_image == "two" else new_per_image
        lo["narrow_from_start"].update(at_start=20.0, at_end=7.0, at_both=7.0 - new)
    text, lo = report_with(quick_outputs, tmp_path, "vae_latent_opt", edit)
    assert says in text
