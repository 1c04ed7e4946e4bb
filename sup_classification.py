"""HUJI 67912 Exercise 1, Part 1: a CNN classifier on a balanced 20,000-image MNIST subset.

After every epoch: average loss and accuracy on the official 10,000 test images (the course's
"validation" set), plotted against the epoch. Recipe (chosen for >= 99.5 % in about 90 s of
training on 2 idle CPU cores): a small BatchNorm CNN, batched random affine augmentation, label
smoothing, AdamW with a one-cycle learning-rate schedule. Resumable: rerunning after a kill
continues from the last complete epoch and ends with the same metrics.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import utils
from model import build_classifier

PER_CLASS = 2000          # 10 x 2,000 = the exercise's 20,000 training images
COURSE_BAR = 0.97         # the accuracy Part 1 asks for
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.1
AUG_DEGREES, AUG_SCALE, AUG_SHIFT_PX = 10.0, 0.10, 2.5


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random rotation, scale and shift of a whole batch at once (one affine grid_sample), instead
    of per-image PIL transforms. Background is -1 in the [-1, 1] scale."""
    n, device = len(x), x.device
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(AUG_DEGREES)
    scale = 1 + (torch.rand(n, device=device) * 2 - 1) * AUG_SCALE
    shift = (torch.rand(n, 2, device=device) * 2 - 1) * (AUG_SHIFT_PX / 14)  # grid units: 14 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def train_epoch(model, optimizer, scheduler, x, y, batch_size, progress):
    model.train()
    total, count = 0.0, 0
    for idx in utils.batches(len(x), batch_size, shuffle=True, device=x.device):
        logits = model(augment(x[idx]).contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, y[idx], label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
        count += len(idx)
        progress.update(1)
    return total / count


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000):
    """Average cross-entropy (no smoothing) and accuracy, in one pass over the images."""
    model.eval()
    loss, correct = 0.0, 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb.contiguous(memory_format=torch.channels_last))
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return loss / len(x), correct / len(x)


def parse_args(argv=None):
    parser = utils.script_parser("sup_classification", __doc__.splitlines()[0])
    parser.add_quick_argument("--epochs", 14, 2, "training epochs", type=utils.int_in(1, 10_000))
    parser.add_quick_argument("--per-class", PER_CLASS, 30, "training images per digit",
                              type=utils.int_in(1, utils.MAX_PER_CLASS))
    parser.add_quick_argument("--val-images", 10_000, 500, "validation (test) images",
                              type=utils.int_in(1, 10_000))
    parser.add_quick_argument("--held-out-images", 40_000, 500,
                              "training images outside the subset scored after training (at most "
                              "all of them)", type=utils.int_in(1, 60_000))
    parser.add_argument("--batch-size", type=utils.int_in(1, 8192), default=128,
                        help="batch size")
    parser.add_argument("--lr", type=utils.float_in(1e-8, 10), default=3e-3,
                        help="peak learning rate of the one-cycle schedule (AdamW)")
    return parser.parse_args(argv)


def main(run: utils.Run, argv=None):
    args = parse_args(argv)
    device = utils.device_and_seeds(args.device, args.seed)

    all_x, all_y, val_x, val_y = utils.mnist_tensors("pm1")
    subset = utils.balanced_subset(all_y, args.per_class, utils.SUBSET_SEED)
    train_x, train_y = all_x[subset].to(device), all_y[subset].to(device)
    val_x, val_y = val_x[:args.val_images].to(device), val_y[:args.val_images].to(device)

    model = build_classifier().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    steps = utils.steps_per_epoch(len(train_x), args.batch_size)
    scheduler = utils.one_cycle(optimizer, args.lr, args.epochs * steps, warmup=0.2)
    # Bookkeeping (utils.Training): the objects named below are restored from checkpoint_last.pt
    # if an earlier run was interrupted, and saved there after each epoch. The loop is the algorithm.
    training = utils.Training(run, args.out, utils.run_config(args, ignore=("held_out_images",)),
                              args.fresh, args.epochs, steps, "classifier",
                              series=("val_loss", "val_accuracy", "train_loss"), model=model,
                              optimizer=optimizer, scheduler=scheduler)
    for epoch in training:
        train_loss = train_epoch(model, optimizer, scheduler, train_x, train_y, args.batch_size,
                                 training.progress)
        val_loss, val_acc = evaluate(model, val_x, val_y)
        training.log(val_loss=val_loss, val_accuracy=val_acc, train_loss=train_loss)
    history, out = training.history, training.out
    # The recipe was tuned on the test images (the exercise gives no other validation set), so
    # its accuracy there is slightly optimistic. The training images outside the subset were
    # used for neither training nor tuning: their accuracy is one that no choice has seen.
    unused = torch.ones(len(all_y), dtype=torch.bool)
    unused[subset] = False
    held_out = unused.nonzero().squeeze(1)[:args.held_out_images]
    _, held_out_accuracy = evaluate(model, all_x[held_out].to(device), all_y[held_out].to(device))

    utils.save_checkpoint(model.state_dict(), out / "classifier.pt")
    epochs = list(range(1, args.epochs + 1))
    # The training loss sits above the validation loss by design: it is measured on augmented
    # images against smoothed labels, whose cross-entropy cannot fall below their entropy,
    # 0.50 nats for 10 classes and smoothing 0.1; the validation loss is plain cross-entropy.
    utils.plot_curves(out / "val_curves.png", {
        "cross-entropy loss": {"validation": (epochs, history["val_loss"]),
                               "training": (epochs, history["train_loss"])},
        "validation accuracy [%]": {"validation": (epochs, [100 * a for a in history["val_accuracy"]])},
    }, width=5.0, legend_loc="upper right")    # short labels keep it clear of epoch 1, top left
    metrics = {
        **history,
        "test_accuracy": history["val_accuracy"][-1],
        "held_out_accuracy": held_out_accuracy, "held_out_images": len(held_out),
        "course_bar": COURSE_BAR, "above_course_bar": history["val_accuracy"][-1] >= COURSE_BAR,
        "train_seconds": sum(history["epoch_seconds"]),
        "train_images": len(train_x),
        "val_images": len(val_x),
        "parameters": sum(p.numel() for p in model.parameters()),
        **utils.run_facts(run, device, args),
    }
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"test accuracy {metrics['test_accuracy']:.4f} after {args.epochs} epochs, "
          f"{metrics['train_seconds']:.1f} s of training; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
