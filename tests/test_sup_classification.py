"""sup_classification.py (HUJI Part 1) end to end in --quick mode, as a user runs it: outputs,
resuming after a kill, --help."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import torch

import sup_classification
from conftest import chain_args, comparable, metrics, run_injected, run_script


def test_quick_run_writes_figure_metrics_and_classifier(quick_outputs):
    out = quick_outputs / "sup_classification"
    m = metrics(out)
    assert len(m["val_loss"]) == len(m["val_accuracy"]) == m["args"]["epochs"] == 2
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy"] == m["val_accuracy"][-1]
    assert m["train_seconds"] > 0 and m["train_images"] == 300
    assert (out / "val_curves.png").stat().st_size > 0
    assert (out / "classifier.pt").is_file()


def test_the_held_out_accuracy_is_on_training_images_outside_the_subset(quick_outputs):
    """Recomputed here: the first 500 training images not in the balanced subset (numpy's
    setdiff1d), read by the saved classifier, scored by scikit-learn."""
    import numpy as np
    from sklearn.metrics import accuracy_score

    import model
    import utils
    m = metrics(quick_outputs / "sup_classification")
    x, y, _, _ = utils.mnist_tensors("pm1")
    subset = utils.balanced_subset(y, 30, utils.SUBSET_SEED).numpy()
    held_out = np.setdiff1d(np.arange(len(y)), subset)[:500]
    classifier = model.load_classifier(quick_outputs / "sup_classification" / "classifier.pt")
    with torch.no_grad():
        predicted = classifier(x[held_out]).argmax(1).numpy()
    assert m["held_out_images"] == 500
    assert m["held_out_accuracy"] == accuracy_score(y[held_out].numpy(), predicted)


def test_augmentation_keeps_shape_scale_and_background():
    x = torch.full((8, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    y = sup_classification.augment(x)
    assert y.shape == x.shape and y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert torch.allclose(y[:, :, :3, :3], torch.full_like(y[:, :, :3, :3], -1.0))


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, quick_outputs):
    """Killed after epoch 1 of the quick run's 2 and run again: equal to the quick chain's
    uninterrupted run of the same command."""
    whole, killed = quick_outputs / "sup_classification", tmp_path / "killed"
    args = chain_args(quick_outputs, "sup_classification")
    proc = run_injected("kill-after-epoch", 1, "sup_classification.py", *args, "--out", killed)
    assert proc.returncode == 137 and not (killed / "metrics.json").exists()
    run_script("sup_classification.py", *args, "--out", killed)    # the same command resumes
    assert comparable(killed) == comparable(whole)
    assert len(metrics(killed)["epoch_seconds"]) == 2
    # the resumed run says so (its wall time covers one epoch of two), the whole one does not
    assert (metrics(killed)["resumed_epochs"], metrics(whole)["resumed_epochs"]) == (1, 0)


def test_help_shows_the_defaults():
    proc = run_script("sup_classification.py", "--help")
    assert "default: 14; 2 with --quick" in proc.stdout and "--seed" in proc.stdout
