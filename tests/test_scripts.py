"""Every script end to end in --quick mode, as a user runs it: outputs written, resume after a kill
gives the same final metrics as an uninterrupted run, bad input is one line and exit code 2."""
import json

import pytest

from conftest import run_script

NONDETERMINISTIC = {"train_seconds", "epoch_seconds", "seconds", "estimate_seconds", "wall_seconds",
                    "args"}


def metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def comparable(m):
    return {k: v for k, v in m.items() if k not in NONDETERMINISTIC}


def test_classifier_quick_writes_figure_and_metrics(quick_outputs):
    out = quick_outputs / "sup_classification"
    m = metrics(out)
    assert len(m["val_loss"]) == len(m["val_accuracy"]) == m["args"]["epochs"] == 2
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy"] == m["val_accuracy"][-1]
    assert m["train_seconds"] > 0
    assert (out / "val_curves.png").stat().st_size > 0
    assert (out / "classifier.pt").is_file()


@pytest.mark.parametrize("script", ["sup_classification.py", "vae_amortized.py",
                                    "vae_latent_opt.py"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, script):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--quick", "--epochs", "3", "--device", "cpu"]
    run_script(script, *args, "--out", whole)
    proc = run_script(script, *args, "--out", killed, env_extra={"VI_TEST_KILL_AFTER_EPOCH": "2"},
                      check=False)
    assert proc.returncode == 137 and not (killed / "metrics.json").exists()
    run_script(script, *args, "--out", killed)             # the same command again resumes
    assert comparable(metrics(killed)) == comparable(metrics(whole))
    assert len(metrics(killed)["epoch_seconds"]) == 3


@pytest.mark.parametrize("script,args,message", [
    ("sup_classification.py", ["--epochs", "0"], "between 1 and"),
    ("sup_classification.py", ["--batch-size", "-1"], "between 1 and"),
    ("sup_classification.py", ["--lr", "nan"], "between"),
    ("vae_amortized.py", ["--latent-dim", "0"], "between 1 and"),
    ("vae_latent_opt.py", ["--device", "tpu"], "invalid choice"),
    ("log_likelihood.py", ["-M", "0"], "between 1 and"),
    ("ppca_pca.py", ["--epochs", "two"], "must be an integer"),
])
def test_bad_flags_exit_2_with_one_line(script, args, message):
    proc = run_script(script, *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_unwritable_out_and_absent_device_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    proc = run_script("sup_classification.py", "--quick", "--out", blocker / "x", check=False)
    assert proc.returncode == 2 and "cannot write" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert blocker.read_text() == "keep me"
    import torch

    if not torch.cuda.is_available():
        proc = run_script("sup_classification.py", "--quick", "--device", "cuda",
                          "--out", tmp_path / "y", check=False)
        assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
        assert not (tmp_path / "y").exists()


def test_corrupt_checkpoint_is_named_and_left_alone(tmp_path):
    ckpt = tmp_path / "checkpoint_last.pt"
    ckpt.write_bytes(b"garbage")
    proc = run_script("vae_amortized.py", "--quick", "--out", tmp_path, "--device", "cpu",
                      check=False)
    assert proc.returncode == 2 and "checkpoint_last.pt" in proc.stderr and "--fresh" in proc.stderr
    assert ckpt.read_bytes() == b"garbage"
    assert not (tmp_path / "metrics.json").exists()


def test_amortized_vae_quick_outputs(quick_outputs):
    amortized = quick_outputs / "vae_amortized"
    m = metrics(amortized)
    for key in ("train_loss", "val_loss", "train_mse", "val_kl", "train_recon_mse", "val_recon_mse"):
        assert len(m[key]) == 2
    assert set(m["final_val"]) == {"loss", "mse", "kl", "recon_mse"}
    assert m["final_val"]["loss"] == pytest.approx(m["final_val"]["mse"] + m["final_val"]["kl"])
    assert m["snapshot_epochs"] == [1, 2]
    assert set(m["sample_quality"]) == {"1", "2", "real test images"}
    assert m["overfit"]["verdict"] in ("yes", "no", "mildly") and m["loss"] == "exercise"
    assert metrics(quick_outputs / "vae_amortized_elbo")["loss"] == "elbo"
    assert len(m["show_val_indices"]) == len(m["show_train_indices"]) == 10
    for name in ("loss_curves.png", "q1_reconstructions_val.png", "q1_reconstructions_train.png",
                 "q2_prior_samples.png", "vae_epoch1.pt", "vae_epoch2.pt", "vae_final.pt"):
        assert (amortized / name).is_file(), name


def test_latent_optimization_quick_outputs(quick_outputs):
    tmp_path = quick_outputs / "vae_latent_opt"
    m = metrics(tmp_path)
    assert len(m["train_loss"]) == 2 and set(m["val_fit_recon_mse"]) == {"1", "2"}
    assert m["amortized_val10_recon_mse"] > 0          # the Q1 comparison row was drawn
    for method in ("amortized", "latent_opt"):           # the same-budget comparison
        assert m["same_budget"][method]["fitted_train"] > 0
    assert set(m["sample_quality"]) == {"amortized", "latent_opt"}
    assert m["verdicts"]["better_q"] in ("amortized", "latent_opt")
    for name in ("loss_curves.png", "q3_reconstructions_train.png", "q3_reconstructions_val.png",
                 "q3_prior_samples.png", "decoder_final.pt"):
        assert (tmp_path / name).is_file(), name


def test_log_likelihood_quick_outputs(quick_outputs):
    tmp_path = quick_outputs / "log_likelihood"
    m = metrics(tmp_path)
    assert len(m["images"]) == 100
    assert sum(i["split"] == "train" for i in m["images"]) == 50
    assert all(i["eq9_elbo"] <= i["eq9_log_px"] + 1e-3 for i in m["images"])
    assert all(i["gap"] == pytest.approx(i["log_px"] - i["eq9_log_px"]) for i in m["images"])
    assert all(i["sd"] >= 0 and 1 <= i["ess"] <= m["num_samples"] + 1e-6 for i in m["images"])
    assert set(m["per_digit"]) == {str(d) for d in range(10)}
    assert m["per_digit"][str(m["most_likely_digit"])]["mean"] == max(
        v["mean"] for v in m["per_digit"].values())
    assert m["train_vs_test"] in ("neither", "train", "test")
    assert len(m["convergence"]["digits"]) == 10 and m["num_samples"] in m["convergence"]["M"]
    for name in ("eq9", "laplace"):
        assert all(len(row) == len(m["convergence"]["M"]) for row in m["convergence"][name])
    for name in ("q4_log_px_examples.png", "q4_log_px_per_digit.png", "q4_convergence.png"):
        assert (tmp_path / name).is_file()
    assert (quick_outputs / "log_likelihood_elbo" / "metrics.json").is_file()    # the ablation


def test_log_likelihood_missing_or_wrong_checkpoint(tmp_path, quick_outputs):
    amortized = quick_outputs / "vae_amortized"
    proc = run_script("log_likelihood.py", "--quick", "--checkpoint", tmp_path / "none.pt",
                      "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "run vae_amortized.py first" in proc.stderr
    proc = run_script("log_likelihood.py", "--quick", "--checkpoint",
                      amortized / "checkpoint_last.pt", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "not a vae_amortized checkpoint" in proc.stderr


def test_ppca_pca_quick_outputs(quick_outputs):
    tmp_path = quick_outputs / "ppca_pca"
    m = metrics(tmp_path)
    for method in ("pca", "ppca_gradient", "ppca_closed_form", "vae"):
        assert m[method]["test_sq_error"] > 0
        assert set(m[method]["test_sq_error_per_digit"]) == {str(d) for d in range(10)}
    assert m["ppca_closed_form"]["test_log_likelihood"] > m["ppca_gradient"]["test_log_likelihood"] - 50
    assert m["ppca_gradient"]["iterations"] > 0 and "initialization" in m["ppca_gradient"]
    assert m["ppca_gradient"]["converged"]
    assert abs(m["ppca_comparison"]["sigma2_relative_error"]) < 0.02
    for name in ("encodings.png", "reconstructions.png", "sq_error_per_digit.png",
                 "ppca_log_likelihood.png", "lattice_ppca.png", "lattice_vae.png", "samples.png"):
        assert (tmp_path / name).is_file(), name
