"""Checkpoints, resume state, seeding, devices, metrics and plots."""
import json
import random

import numpy as np
import pytest
import torch

import utils


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

    with pytest.raises(RuntimeError):
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


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    utils.seed_everything(3)
    utils.save_checkpoint({"rng": utils.rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    utils.seed_everything(99)
    utils.set_rng_state(utils.load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_resume_refuses_other_settings(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    utils.Resume(tmp_path / "last.pt", {"lr": 1e-3}, model=net, optimizer=opt).save(1, {"a": [1]})
    start, history = utils.Resume(tmp_path / "last.pt", {"lr": 1e-3}, model=net,
                                  optimizer=opt).start()
    assert start == 2 and history == {"a": [1]}
    with pytest.raises(utils.UsageError, match="lr.*--fresh"):
        utils.Resume(tmp_path / "last.pt", {"lr": 1e-2}, model=net, optimizer=opt).start()
    assert utils.Resume(tmp_path / "last.pt", {"lr": 1e-2}, fresh=True, model=net,
                        optimizer=opt).start() == (1, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_absent_device_is_a_usage_error():
    with pytest.raises(utils.UsageError, match="--device cpu"):
        utils.get_device("cuda")
    assert utils.get_device("cpu") == torch.device("cpu")


def test_metrics_and_plots_are_written(tmp_path):
    utils.write_metrics(tmp_path / "metrics.json", {"a": np.float32(1.5), "b": torch.arange(2),
                                                    "p": tmp_path})
    assert json.loads((tmp_path / "metrics.json").read_text())["b"] == [0, 1]
    with pytest.raises(utils.UsageError, match="NaN"):  # NaN never reaches metrics.json
        utils.write_metrics(tmp_path / "metrics.json", {"a": float("nan")})
    assert json.loads((tmp_path / "metrics.json").read_text())["a"] == 1.5
    utils.plot_curves(tmp_path / "c.png", {"loss": {"train": ([1, 2], [3.0, 2.0])}})
    images = torch.rand(10, 1, 28, 28) * 2 - 1
    utils.plot_image_rows(tmp_path / "r.png", [images, images], ["a", "b"], col_labels=range(10))
    utils.plot_image_rows(tmp_path / "t.png", [images], ["a"], cell_titles=[["1\n2"] * 10])
    utils.save_image_grid(tmp_path / "g.png", images, nrow=5)
    for name in ("c.png", "r.png", "t.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "g.png", "metrics.json",
                                                          "r.png", "t.png"]     # no temp files


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
        utils.claim_out_dir(blocker / "out")
