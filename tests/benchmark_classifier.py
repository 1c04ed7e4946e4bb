"""Benchmark (not collected by pytest): time-to-accuracy of sup_classification.py against the
pytorch/examples MNIST recipe, side by side in one run on the same 20,000 images.

The reference, written here from its description: two 3x3 convs (32, 64), max-pool, dropout 0.25,
FC 9216 -> 128, dropout 0.5, FC 128 -> 10; Adadelta lr 1.0, StepLR(gamma 0.7) per epoch, batch 64,
a torchvision DataLoader with per-sample ToTensor() + Normalize((0.1307,), (0.3081,)).
Both are evaluated on the 10,000 test images after every epoch, and that time counts for both.

    .venv/bin/python tests/benchmark_classifier.py [--ref-epochs 5]
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sup_classification  # noqa: E402
import utils  # noqa: E402


class ExamplesNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def reference(epochs: int, seed: int):
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    torch.manual_seed(seed)
    from torchvision import datasets

    utils.load_mnist()             # the IDX files exist (rebuilt from the offline copy if not)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train, test = (datasets.MNIST(str(utils.DATA_DIR), train=t, download=False, transform=transform)
                   for t in (True, False))
    subset = Subset(train, utils.balanced_subset(train.targets, 2000, utils.SUBSET_SEED).tolist())
    train_loader = DataLoader(subset, batch_size=64, shuffle=True)
    test_loader = DataLoader(test, batch_size=1000)
    net = ExamplesNet()
    opt = torch.optim.Adadelta(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    curve, start = [], time.perf_counter()
    for _ in range(epochs):
        net.train()
        for x, y in train_loader:
            opt.zero_grad()
            F.nll_loss(net(x), y).backward()
            opt.step()
        sched.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (net(x).argmax(1) == y).sum().item()
        curve.append((time.perf_counter() - start, correct / len(test)))
        print(f"  reference epoch {len(curve)}: {curve[-1][1]:.4f} at {curve[-1][0]:.1f} s",
              flush=True)
    return curve


def ours(seed: int):
    with tempfile.TemporaryDirectory() as out:
        sup_classification.main(["--out", out, "--seed", str(seed), "--device", "cpu"])
        m = utils.read_metrics(Path(out) / "metrics.json")
    elapsed = torch.tensor(m["epoch_seconds"]).cumsum(0).tolist()
    return list(zip(elapsed, m["val_accuracy"]))


def time_to(curve, accuracy):
    return next((t for t, acc in curve if acc >= accuracy), float("inf"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ref-epochs", type=int, default=5, help="epochs of the reference recipe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("reference (pytorch/examples recipe):")
    ref = reference(args.ref_epochs, args.seed)
    print("ours (sup_classification.py defaults):")
    mine = ours(args.seed)
    ref_time, ref_acc = ref[-1]
    our_time, our_acc = mine[-1]
    t_ours = time_to(mine, ref_acc)
    print(f"\nreference: {ref_acc:.4f} after {len(ref)} epochs, {ref_time:.1f} s "
          f"(best {max(a for _, a in ref):.4f})")
    print(f"ours:      {our_acc:.4f} after {len(mine)} epochs, {our_time:.1f} s")
    print(f"time to the reference's final accuracy {ref_acc:.4f}: ours {t_ours:.1f} s vs "
          f"reference {ref_time:.1f} s -> ratio {ref_time / t_ours:.2f}x")


if __name__ == "__main__":
    main()
