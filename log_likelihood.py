"""HUJI 67912 Exercise 1, Part 2, Q4: importance-sampled log p(x) of the amortized VAE (Eq. 9).

For each digit, 5 images from the VAE's 5,000 training images and 5 from the test set:
(a) one image per digit with its log p(x), (b) the mean log p(x) per digit, (c) training vs test.
Beyond the question: how the estimate settles as M grows, with the ELBO beside it.
"""
from __future__ import annotations

import math
import resource
import time

import numpy as np
import torch
from tqdm import tqdm

import model as vae_model
import utils
from vae_amortized import load_snapshot, vae_data

CONVERGENCE_M = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)


def parse_args(argv=None):
    parser = utils.script_parser("log_likelihood", __doc__.splitlines()[0], fresh=False)
    parser.add_argument("--checkpoint", type=utils.Path,
                        default=utils.OUTPUTS_DIR / "vae_amortized" / "vae_final.pt",
                        help="the amortized VAE (written by vae_amortized.py)")
    parser.add_quick_argument(("--num-samples", "-M"), 1000, 50, "importance samples per image",
                              type=utils.positive_int)
    parser.add_argument("--per-digit", type=utils.positive_int, default=5,
                        help="images per digit from each of the training and test sets")
    parser.add_argument("--sigma-p", type=utils.positive_float, default=0.4,
                        help="std of p(x|z) = N(G(z), sigma_p^2 I)")
    parser.add_argument("--chunk-size", type=utils.positive_int, default=4096,
                        help="decoder evaluations held in memory at once")
    return parser.parse_args(argv)


def estimate(vae, x, args, generator, progress, num_samples=None):
    """Eq. 9 for a batch of images, q from the encoder."""
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
    result = vae_model.importance_log_likelihood(
        x, mu, logvar, vae.decoder, args.sigma_p, num_samples or args.num_samples,
        args.chunk_size, generator)
    progress.update(len(x))
    return result


def mean_and_se(values) -> tuple:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def main(argv=None):
    args = parse_args(argv)
    device = utils.get_device(args.device)
    if not args.checkpoint.is_file():
        raise utils.UsageError(f"{args.checkpoint} not found: run vae_amortized.py first "
                               f"(or pass --checkpoint)")
    ckpt = utils.load_checkpoint(args.checkpoint, device)
    latent_dim = ckpt.get("latent_dim") if isinstance(ckpt, dict) else None
    if not isinstance(latent_dim, int):
        raise utils.CheckpointError(f"{args.checkpoint} is not a VAE written by vae_amortized.py")
    vae = vae_model.VAE(latent_dim).to(device).eval()
    load_snapshot(args.checkpoint, vae, "vae_amortized", device)
    out = utils.prepare_out_dir(args.out)
    utils.seed_everything(args.seed)

    # 5 training images (from the VAE's own 5,000) and 5 test images per digit, seeded.
    data = vae_data(args.quick, device)
    pick_train = utils.balanced_subset(data["train_y"], args.per_digit, args.seed)
    pick_test = utils.balanced_subset(data["val_y"], args.per_digit, args.seed)
    x = torch.cat([data["train_x"][pick_train.to(device)], data["val_x"][pick_test.to(device)]])
    digits = torch.cat([data["train_y"][pick_train], data["val_y"][pick_test]]).tolist()
    split = ["train"] * len(pick_train) + ["test"] * len(pick_test)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    progress = tqdm(total=len(x), desc=f"log p(x), M={args.num_samples}", unit="image")
    t0 = time.perf_counter()
    result = estimate(vae, x, args, generator, progress)
    seconds = time.perf_counter() - t0
    progress.close()
    log_px, stderr, elbo, ess = (result[k].cpu().numpy()
                                 for k in ("log_px", "stderr", "elbo", "ess"))

    # Convergence in M: one stream of max(M) samples per image, estimates from its prefixes.
    conv_idx = [digits.index(d) for d in (1, 0, 8) if d in digits][:3]
    conv_max = 200 if args.quick else CONVERGENCE_M[-1]
    conv_bar = tqdm(total=len(conv_idx), desc=f"convergence, M up to {conv_max}", unit="image")
    conv_log_w = estimate(vae, x[conv_idx], args, generator, conv_bar, conv_max)["log_w"].cpu()
    conv_bar.close()
    ms = [m for m in CONVERGENCE_M if m <= conv_max]
    convergence = {
        "M": ms,
        "images": [{"digit": digits[i], "split": split[i],
                    "log_px": [(torch.logsumexp(conv_log_w[:m, j], 0) - math.log(m)).item()
                               for m in ms],
                    "elbo": [conv_log_w[:m, j].mean().item() for m in ms]}
                   for j, i in enumerate(conv_idx)],
    }

    per_digit = {}
    for d in range(10):
        vals = [v for v, dd in zip(log_px, digits) if dd == d]
        mean, se = mean_and_se(vals)
        per_digit[str(d)] = {"mean": mean, "se": se, "n": len(vals)}
    means = {s: mean_and_se([v for v, ss in zip(log_px, split) if ss == s]) for s in ("train", "test")}
    diff = means["train"][0] - means["test"][0]
    diff_se = math.hypot(means["train"][1], means["test"][1])
    # Paired by digit: the same digits appear in both splits, so compare digit by digit too.
    paired = [np.mean([v for v, dd, ss in zip(log_px, digits, split) if dd == d and ss == "train"])
              - np.mean([v for v, dd, ss in zip(log_px, digits, split) if dd == d and ss == "test"])
              for d in range(10)]
    paired_mean, paired_se = mean_and_se(paired)

    # (a) one training and one test image per digit, with log p(x) in the title.
    first = {s: [next(i for i in range(len(x)) if digits[i] == d and split[i] == s)
                 for d in range(10)] for s in ("train", "test")}
    utils.plot_image_rows(
        out / "q4_log_px_examples.png", [x[first["train"]], x[first["test"]]],
        ["training", "test"],
        cell_titles=[[f"{d}: {log_px[i]:.0f}" for d, i in enumerate(first[s])]
                     for s in ("train", "test")],
        title=f"Q4(a): log p(x) in nats (Eq. 9, M = {args.num_samples})")
    plot_bars(out / "q4_log_px_per_digit.png", per_digit, log_px, digits, split, args.num_samples)
    plot_convergence(out / "q4_convergence.png", convergence)

    metrics = {
        "images": [{"digit": d, "split": s, "index": int(idx), "log_px": float(lp),
                    "stderr": float(se), "elbo": float(el), "ess": float(es)}
                   for d, s, idx, lp, se, el, es in zip(
                       digits, split,
                       data["subset"][pick_train].tolist() + pick_test.tolist(),
                       log_px, stderr, elbo, ess)],
        "per_digit": per_digit,
        "most_likely_digit": int(max(per_digit, key=lambda d: per_digit[d]["mean"])),
        "least_likely_digit": int(min(per_digit, key=lambda d: per_digit[d]["mean"])),
        "train_mean": means["train"][0], "train_se": means["train"][1],
        "test_mean": means["test"][0], "test_se": means["test"][1],
        "train_minus_test": diff, "train_minus_test_se": diff_se,
        "paired_train_minus_test": paired_mean, "paired_train_minus_test_se": paired_se,
        "max_mc_stderr": float(np.nanmax(stderr)) if len(stderr) else float("nan"),
        "median_ess": float(np.median(ess)),
        "min_ess": float(np.min(ess)),
        "mean_gap_log_px_minus_elbo": float(np.mean(log_px - elbo)),
        "convergence": convergence,
        "num_samples": args.num_samples,
        "sigma_p": args.sigma_p,
        "latent_dim": latent_dim,
        "estimate_seconds": seconds,
        # Peak resident memory of the whole process (data loading included), in MB (Linux: KB).
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checkpoint": str(args.checkpoint),
        "device": str(device),
        "args": vars(args),
    }
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"{len(x)} images, M = {args.num_samples}: {seconds:.1f} s. Most likely digit "
          f"{metrics['most_likely_digit']}; train {means['train'][0]:.1f} vs test "
          f"{means['test'][0]:.1f} nats; outputs in {out}")


def plot_bars(path, per_digit, log_px, digits, split, num_samples):
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    d = np.arange(10)
    ax.bar(d, [per_digit[str(i)]["mean"] for i in d], yerr=[per_digit[str(i)]["se"] for i in d],
           color="#8fb3d9", capsize=3, label="mean of 10 images (± s.e.)")
    for s, marker in (("train", "o"), ("test", "x")):
        pts = [(dd, v) for v, dd, ss in zip(log_px, digits, split) if ss == s]
        ax.scatter([p[0] + (-0.15 if s == "train" else 0.15) for p in pts], [p[1] for p in pts],
                   marker=marker, s=14, color="k" if s == "train" else "#c0392b", label=s, zorder=3)
    ax.set_xticks(d)
    ax.set_xlabel("digit")
    ax.set_ylabel("log p(x) [nats]")
    ax.set_title(f"Q4(b): log p(x) per digit (M = {num_samples})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    utils.save_figure(fig, path)


def plot_convergence(path, convergence):
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, img in enumerate(convergence["images"]):
        color = f"C{k}"
        label = f"digit {img['digit']} ({img['split']})"
        ax.plot(convergence["M"], img["log_px"], marker="o", color=color, label=label + ", Eq. 9")
        ax.plot(convergence["M"], img["elbo"], ls="--", color=color, label=label + ", ELBO")
    ax.set_xscale("log")
    ax.set_xlabel("importance samples M")
    ax.set_ylabel("nats")
    ax.set_title("log p(x) estimate vs M (prefixes of one sample stream)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    utils.save_figure(fig, path)


if __name__ == "__main__":
    utils.run_main(main)
