"""Both reports built from --quick outputs: page limit, a section per question, and numbers in
the text that are the ones in the metrics (read at build time, not typed by hand)."""
import json
import re
import shutil

import pytest

from conftest import run_script


@pytest.fixture(scope="module")
def reports(quick_outputs, tmp_path_factory):
    from report import build_report

    out = tmp_path_factory.mktemp("report")
    ex1, lab = build_report.main(["--outputs", str(quick_outputs), "--out", str(out),
                                  "--device", "cpu"])
    return ex1, lab, out


def metrics(quick_outputs, script):
    return json.loads((quick_outputs / script / "metrics.json").read_text())


def test_pdfs_written_and_exercise_1_within_five_pages(reports):
    ex1, lab, out = reports
    for name in ("ex1_report.pdf", "apml_lab_report.pdf"):
        assert (out / name).read_bytes()[:5] == b"%PDF-"
    assert 1 <= ex1.pages <= 5
    assert lab.pages >= 2


def test_every_question_has_its_section(reports):
    ex1, lab, _ = reports
    text = ex1.text()
    for heading in ("Part 1", "Q1:", "Q2:", "Q3:", "Q4:", "Eq. 7", "Use of AI tools"):
        assert heading in text, heading
    for part in ("(a)", "(b)", "(c)", "Did it overfit?", "Which method proposed better q",
                 "Was the initialization sufficient"):
        assert part in text, part
    text = lab.text()
    for q in ["3.1", "3.2", "3.3", "3.4", "3.5"] + [f"Q4.{i}:" for i in range(1, 11)]:
        assert q in text, q


def test_numbers_in_the_text_come_from_the_metrics(reports, quick_outputs):
    ex1, lab, _ = reports
    text = ex1.text()
    c = metrics(quick_outputs, "sup_classification")
    ll = metrics(quick_outputs, "log_likelihood")
    lo = metrics(quick_outputs, "vae_latent_opt")
    assert f"Final accuracy: {100 * c['test_accuracy']:.2f} %" in text
    assert f"The most likely digit is {ll['most_likely_digit']} " in text
    assert f"training images {ll['train_mean']:.1f} +- {ll['train_se']:.1f}" in text
    assert f"test images {ll['test_mean']:.1f} +- {ll['test_se']:.1f}" in text
    assert f"{lo['final_train']['recon_mse']:.4f} (latent optimization)" in text
    p = metrics(quick_outputs, "ppca_pca")
    text = lab.text()
    assert f"Average squared reconstruction error of PCA on the test set (sum over pixels, mean " \
           f"over images): {p['pca']['test_sq_error']:.2f}" in re.sub(r"\s+", " ", text)
    assert f"The VAE's average test squared error is {p['vae']['test_sq_error']:.2f}" in text
    assert f"{p['ppca_gradient']['iterations']:,} iterations" in text


def test_the_text_follows_a_different_outcome(reports, quick_outputs, tmp_path):
    """Edit the metrics (another run's outcome): the report's answers change with them."""
    from report import build_report

    copy = tmp_path / "outputs"
    shutil.copytree(quick_outputs, copy)
    path = copy / "log_likelihood" / "metrics.json"
    ll = json.loads(path.read_text())
    ll["most_likely_digit"] = (ll["most_likely_digit"] + 3) % 10
    ll["train_mean"], ll["train_minus_test"], ll["train_minus_test_se"] = 999.0, 500.0, 1.0
    path.write_text(json.dumps(ll))
    ex1, _ = build_report.main(["--outputs", str(copy), "--device", "cpu"])
    assert f"The most likely digit is {ll['most_likely_digit']} " in ex1.text()
    assert "More likely: the model has fitted the images it was trained on" in ex1.text()


def test_missing_outputs_name_the_scripts(tmp_path):
    proc = run_script("report/build_report.py", "--outputs", tmp_path, check=False)
    assert proc.returncode == 2
    assert "run sup_classification.py, then vae_amortized.py" in proc.stderr
    assert proc.stderr.count("\n") == 1
