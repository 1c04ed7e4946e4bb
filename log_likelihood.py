"""HUJI 67912 Exercise 1, Part 2, Q4: importance-sampled log p(x) of the amortized VAE (Eq. 9).

For each digit, 5 images from the VAE's 5,000 training images and 5 from the test set:
(a) one image per digit with its log p(x), (b) the mean log p(x) per digit, (c) training vs test.

Two estimates per image, both through the same log-sum-exp estimator of Eq. 9 with M samples:
  Eq. 9 as the exercise asks   z_i ~ q(z|x), the encoder's Gaussian;
  Laplace (converged)          z_i ~ N(z*, H^-1), fitted to each image's own posterior: z* the
                               mode of log p(x|z) + log p(z), H = I + J^T J / sigma_p^2.
Per image and estimator: the effective sample size, the Pareto k-hat of the largest weights
(above min(1 - 1/log10 M, 0.7): not trustworthy) and a bootstrap standard deviation. Q4 (a) to
(c) are answered from the converged estimate with Eq. 9's beside it; their difference is a finding of its own.
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

CONVERGENCE_M = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)


def parse_args(argv=None):
    parser = utils.script_parser("log_likelihood", __doc__.splitlines()[0], resumable=False)
    parser.add_argument("--checkpoint", type=utils.Path,
                        default=utils.OUTPUTS_DIR / "vae_amortized" / "vae_final.pt",
                        help="the amortized VAE (written by vae_amortized.py)")
    utils.add_vae_data_arguments(parser)      # the split the checkpoint's VAE was trained on
    parser.add_quick_argument(("--num-samples", "-M"), 1000, 50, "importance samples per image",
                              type=utils.int_in(1, 100_000))
    parser.add_argument("--per-digit", type=utils.int_in(1, 500), default=5,
                        help="images per digit from each of the training and test sets")
    parser.add_argument("--sigma-p", type=utils.float_in(1e-3, 1e3), default=0.4,
                        help="std of p(x|z) = N(G(z), sigma_p^2 I)")
    parser.add_argument("--chunk-size", type=utils.int_in(1, 16_384), default=1024,
                        help="decoder evaluations held in memory at once")
    parser.add_quick_argument("--adam-steps", 100, 20, "Adam steps towards each image's "
                              "posterior mode (Laplace proposal)", type=utils.int_in(0, 100_000))
    parser.add_quick_argument("--newton-steps", 2, 1, "Gauss-Newton steps after Adam",
                              type=utils.int_in(0, 100))
    parser.add_quick_argument("--convergence-max", 10000, 200, "largest M of the convergence "
                              "study (10 test images, one per digit)",
                              type=utils.int_in(1, 100_000))
    parser.add_quick_argument("--bootstrap", 1000, 100, "bootstrap resamples for the error bars",
                              type=utils.int_in(2, 100_000))
    return parser.parse_args(argv)


def estimate(x, mean, scale, vae, args, generator, num_samples):
    """Eq. 9 with the proposal N(mean, scale scale^T), plus its bootstrap standard deviation."""
    result = vae_model.importance_log_likelihood(x, mean, scale, vae.decoder, args.sigma_p,
                                                 num_samples, args.chunk_size, generator)
    result["sd"] = vae_model.bootstrap_sd(result["log_w"], args.bootstrap, seed=args.seed)
    return result


def mean_and_se(values) -> tuple:
    values = np.asarray(values, dtype=float)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


def summarize(log_px, digits, split) -> dict:
    """Q4 (b) and (c) from one set of per-image estimates: means per digit, the most and least
    likely digits and the digits statistically tied with them, training vs test."""
    log_px, digits, split = np.asarray(log_px), np.asarray(digits), np.asarray(split)
    per_digit = {}
    for d in range(10):
        mean, se = mean_and_se(log_px[digits == d])
        per_digit[str(d)] = {"mean": mean, "se": se, "n": int((digits == d).sum())}
    means = {d: v["mean"] for d, v in per_digit.items()}
    most, least = max(means, key=means.get), min(means, key=means.get)

    def tied_with(best):   # digits whose mean is within two combined standard errors of `best`
        return [int(d) for d in per_digit if d != best and abs(means[d] - means[best])
                < 2 * math.hypot(per_digit[d]["se"], per_digit[best]["se"])]

    train, test = mean_and_se(log_px[split == "train"]), mean_and_se(log_px[split == "test"])
    diff, diff_se = train[0] - test[0], math.hypot(train[1], test[1])
    paired = [log_px[(digits == d) & (split == "train")].mean()
              - log_px[(digits == d) & (split == "test")].mean() for d in range(10)]
    paired_mean, paired_se = mean_and_se(paired)
    z = diff / diff_se if diff_se > 0 else 0.0
    return {"per_digit": per_digit, "most_likely_digit": int(most), "least_likely_digit": int(least),
            "most_likely_tied_with": tied_with(most), "least_likely_tied_with": tied_with(least),
            "train_mean": train[0], "train_se": train[1], "test_mean": test[0], "test_se": test[1],
            "train_minus_test": diff, "train_minus_test_se": diff_se,
            "paired_train_minus_test": paired_mean, "paired_train_minus_test_se": paired_se,
            # (c)'s verdict: "neither" unless the difference exceeds two standard errors.
            "train_vs_test": "neither" if abs(z) < 2 else ("train" if z > 0 else "test")}


def finite_or_none(value):
    """JSON has no NaN or infinity: k-hat is NaN when M is too small to fit a tail (None here) and
    -inf for exactly equal weights (a bounded tail: -1, the uniform distribution's k, or less)."""
    value = float(value)
    return value if math.isfinite(value) else (None if math.isnan(value) else max(value, -1e9))


def khat_threshold(num_samples: int) -> float:
    """The k-hat above which an estimate from num_samples draws is unreliable, by the current
    PSIS rule (Vehtari et al. 2024; R package loo >= 2.7): min(1 - 1/log10 S, 0.7), so 0.67 at
    S = 1,000 and 0.7 from S = 10,000 on."""
    return min(1 - 1 / math.log10(num_samples), 0.7)


def diagnostics(result, num_samples: int) -> dict:
    ess, khat, sd = (result[k].cpu().numpy() for k in ("ess", "khat", "sd"))
    fitted = khat[~np.isnan(khat)]       # k-hat needs M >= 25
    threshold = khat_threshold(num_samples)
    return {"median_ess": float(np.median(ess)), "min_ess": float(ess.min()),
            "share_ess_below_2": float((ess < 2).mean()),
            "median_khat": finite_or_none(np.median(fitted)) if len(fitted) else None,
            "khat_threshold": threshold,
            "share_khat_above_threshold": (float((fitted > threshold).mean()) if len(fitted)
                                           else None),
            "median_sd": float(np.median(sd)), "max_sd": float(sd.max())}


def main(argv=None):
    args = parse_args(argv)
    device = utils.start_run(args)
    if not args.checkpoint.is_file():
        raise utils.UsageError(f"{args.checkpoint} not found: run vae_amortized.py first "
                               f"(or pass --checkpoint)")
    vae = vae_model.load_amortized_vae(args.checkpoint, device)
    # Channels-last weights: decoding 1,024 latents at a time runs at about 2x the speed on a
    # CPU (tests/benchmark_cpu.py), with the same results up to float rounding.
    vae.decoder.to(memory_format=torch.channels_last)
    if vae.subset_per_class is not None and vae.subset_per_class != args.per_class:
        raise utils.UsageError(f"{args.checkpoint} was trained on {vae.subset_per_class} images "
                               f"per digit; pass --per-class {vae.subset_per_class}")
    data = utils.vae_data(args.per_class, args.val_images, device)
    available = min(int(torch.bincount(labels, minlength=10).min())
                    for labels in (data["train_y"], data["val_y"]))
    if args.per_digit > available:
        raise utils.UsageError(f"--per-digit {args.per_digit}: only {available} images of some "
                               f"digit are available; use --per-digit {available} or less")
    out = utils.claim_out_dir(args.out)

    # 5 training images (from the VAE's own 5,000) and 5 test images per digit, seeded.
    pick_train = utils.balanced_subset(data["train_y"], args.per_digit, args.seed)
    pick_test = utils.balanced_subset(data["val_y"], args.per_digit, args.seed)
    x = torch.cat([data["train_x"][pick_train.to(device)], data["val_x"][pick_test.to(device)]])
    digits = torch.cat([data["train_y"][pick_train], data["val_y"][pick_test]]).tolist()
    split = ["train"] * len(pick_train) + ["test"] * len(pick_test)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    stages = tqdm(total=4, desc="Q4", unit="stage")
    t0 = time.perf_counter()
    stages.set_description("Q4: Eq. 9 with the encoder's q")
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
    eq9 = estimate(x, mu, torch.exp(0.5 * logvar), vae, args, generator, args.num_samples)
    seconds = {"eq9": time.perf_counter() - t0}
    stages.update(1)

    t0 = time.perf_counter()
    stages.set_description("Q4: Laplace proposal (posterior mode and curvature)")
    centre, scale = vae_model.laplace_proposal(x, vae.decoder, args.sigma_p, mu, args.adam_steps,
                                               newton_steps=args.newton_steps)
    seconds["laplace_fit"] = time.perf_counter() - t0
    stages.update(1)
    t0 = time.perf_counter()
    stages.set_description("Q4: Eq. 9 with the Laplace proposal")
    lap = estimate(x, centre, scale, vae, args, generator, args.num_samples)
    seconds["laplace_estimate"] = time.perf_counter() - t0
    stages.update(1)

    # Convergence in M: for one test image per digit, one stream of samples per estimator, and
    # the estimate from each prefix of it.
    t0 = time.perf_counter()
    stages.set_description(f"Q4: convergence up to M = {args.convergence_max:,}")
    conv_idx = [next(i for i in range(len(x)) if digits[i] == d and split[i] == "test")
                for d in range(10)]
    ms = sorted({m for m in (*CONVERGENCE_M, args.num_samples) if m <= args.convergence_max}
                | {args.convergence_max})
    streams = {"eq9": (mu, torch.exp(0.5 * logvar)), "laplace": (centre, scale)}
    convergence = {"M": ms, "digits": [digits[i] for i in conv_idx]}
    for name, (mean, sc) in streams.items():
        log_w = vae_model.importance_log_likelihood(
            x[conv_idx], mean[conv_idx], sc[conv_idx], vae.decoder, args.sigma_p,
            args.convergence_max, args.chunk_size, generator)["log_w"].cpu()
        convergence[name] = [[(torch.logsumexp(log_w[:m, j], 0) - math.log(m)).item()
                              for m in ms] for j in range(len(conv_idx))]
    seconds["convergence"] = time.perf_counter() - t0
    stages.update(1)
    stages.close()

    # Why Eq. 9's weights degenerate: the encoder's variances against the fitted posterior's,
    # its marginal variances diag(H^-1) and its conditional ones 1 / diag(H). A diagonal q that
    # is wider than the marginals wastes samples; one narrower than them (what fitting a
    # diagonal q to a correlated posterior by KL(q || p) gives) has heavy-tailed weights.
    cov_l = scale @ scale.transpose(1, 2)
    log_q_var, log_marginal = logvar.double(), cov_l.diagonal(dim1=1, dim2=2).double().log()
    log_conditional = -torch.linalg.inv(cov_l.double()).diagonal(dim1=1, dim2=2).log()
    q_width = {"vs_marginal": (log_q_var - log_marginal).mean().exp().item(),
               "vs_conditional": (log_q_var - log_conditional).mean().exp().item(),
               "share_narrower_than_marginal": (log_q_var < log_marginal).double().mean().item(),
               "correlation_inflation": (log_marginal - log_conditional).mean().exp().item()}
    kl, kl_mean = vae_model.kl_full_to_diagonal(centre.double(), scale.double(), mu.double(),
                                                logvar.double())
    mismatch = {"kl_median": kl.median().item(), "kl_mean_part_median": kl_mean.median().item(),
                "kl_min": kl.min().item(), "log_M": math.log(args.num_samples)}

    # Ink: how many pixels are lit (above the -1 background) in each image.
    ink = (x > -1).flatten(1).sum(1).cpu().numpy()
    lap_px, eq9_px = lap["log_px"].cpu().numpy(), eq9["log_px"].cpu().numpy()
    gap = lap_px - eq9_px
    at = ms.index(args.num_samples) if args.num_samples in ms else None

    def movement(name):   # how far each image's estimate moves from M to the largest M
        if at is None:
            return None
        shifts = [row[-1] - row[at] for row in convergence[name]]
        return {"min": float(min(shifts)), "max": float(max(shifts)),
                "max_abs": float(max(map(abs, shifts)))}

    per_image = []
    for k in range(len(x)):
        per_image.append({
            "digit": digits[k], "split": split[k], "ink": int(ink[k]),
            "index": int((data["subset"][pick_train].tolist() + pick_test.tolist())[k]),
            "log_px": float(lap_px[k]), "sd": float(lap["sd"][k]), "ess": float(lap["ess"][k]),
            "khat": finite_or_none(lap["khat"][k]),
            "eq9_log_px": float(eq9_px[k]), "eq9_sd": float(eq9["sd"][k]),
            "eq9_ess": float(eq9["ess"][k]), "eq9_khat": finite_or_none(eq9["khat"][k]),
            "eq9_elbo": float(eq9["elbo"][k]), "gap": float(gap[k])})
    converged, exercise = summarize(lap_px, digits, split), summarize(eq9_px, digits, split)
    for d in range(10):
        converged["per_digit"][str(d)]["eq9_mean"] = exercise["per_digit"][str(d)]["mean"]
        converged["per_digit"][str(d)]["gap_mean"] = float(gap[np.asarray(digits) == d].mean())
    metrics = {
        "images": per_image,
        **converged,                               # Q4 (b), (c) from the converged estimate
        "eq9": exercise,                           # the same from Eq. 9 with the encoder's q
        "diagnostics": {"laplace": diagnostics(lap, args.num_samples),
                        "eq9": diagnostics(eq9, args.num_samples)},
        "gap": {"mean": float(gap.mean()), "median": float(np.median(gap)),
                "max": float(gap.max()), "min": float(gap.min())},
        # geometric means over images and latent dimensions of the variance ratios
        "q_width": q_width,
        # KL(Laplace posterior || encoder's q): about exp(KL) samples are needed (vs log M)
        "proposal_mismatch": mismatch,
        "convergence": convergence,
        "convergence_movement": {"laplace": movement("laplace"), "eq9": movement("eq9")},
        "ink_correlation": float(np.corrcoef(ink, lap_px)[0, 1]),
        "ink_per_digit": {str(d): float(ink[np.asarray(digits) == d].mean()) for d in range(10)},
        "num_samples": args.num_samples,
        "sigma_p": args.sigma_p,
        "latent_dim": vae.latent_dim,
        "seconds": seconds,
        "estimate_seconds": seconds["eq9"] + seconds["laplace_fit"] + seconds["laplace_estimate"],
        # Peak resident memory of the whole process (data loading included), in MB (Linux: KB).
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checkpoint": str(args.checkpoint),
        "wall_seconds": utils.wall_seconds(),
        "device": str(device),
        "args": vars(args),
    }

    # (a) one training and one test image per digit: converged log p(x), Eq. 9's below it.
    first = {s: [next(i for i in range(len(x)) if digits[i] == d and split[i] == s)
                 for d in range(10)] for s in ("train", "test")}
    utils.plot_image_rows(
        out / "q4_log_px_examples.png", [x[first["train"]], x[first["test"]]],
        ["training", "test"],
        cell_titles=[[f"{lap_px[i]:.0f}\n({eq9_px[i]:.0f})".replace("-", "\u2212")
                      for i in first[s]] for s in ("train", "test")], width=utils.PAGE_WIDTH)
    plot_per_digit(out / "q4_log_px_per_digit.png", converged["per_digit"])
    plot_convergence(out / "q4_convergence.png", convergence, args.num_samples)
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"{len(x)} images, M = {args.num_samples}: {metrics['estimate_seconds']:.1f} s. "
          f"Most likely digit {converged['most_likely_digit']}; train "
          f"{converged['train_mean']:.1f} vs test {converged['test_mean']:.1f} nats (Laplace); "
          f"Eq. 9 lower by {metrics['gap']['mean']:.1f} on average; outputs in {out}")


def plot_per_digit(path, per_digit):
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(utils.HALF_WIDTH, 2.2))
    d = np.arange(10)
    ax.bar(d - 0.2, [per_digit[str(i)]["mean"] for i in d], 0.4,
           yerr=[per_digit[str(i)]["se"] for i in d], color="#2e6da4", capsize=2,
           label="Laplace proposal (converged)")
    ax.bar(d + 0.2, [per_digit[str(i)]["eq9_mean"] for i in d], 0.4, color="#c9a227",
           label="Eq. 9, encoder's q")
    ax.set_xticks(d)
    ax.set_xlabel("digit")
    ax.set_ylabel("mean log p(x) [nats]")
    ax.grid(axis="y", alpha=0.3)
    # The bars hang down from 0 to about -400: the legend goes above the axes, never on a bar.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=7)
    utils.save_figure(fig, path)


def plot_convergence(path, convergence, num_samples):
    """Each image's estimate minus its Laplace estimate at the largest M, against M."""
    plt = utils.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(utils.PAGE_WIDTH, 2.2))
    ms = convergence["M"]
    for ax, name, title in ((axes[0], "eq9", "Eq. 9, encoder's q"),
                            (axes[1], "laplace", "Laplace proposal")):
        for j, digit in enumerate(convergence["digits"]):
            ref = convergence["laplace"][j][-1]
            ax.plot(ms, [v - ref for v in convergence[name][j]], marker="o", markersize=2,
                    color=f"C{j}", label=str(digit))
        ax.axvline(num_samples, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("importance samples M")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("estimate minus reference [nats]")
    # Beside the axes, not on them: the lines may end anywhere in the panel.
    axes[1].legend(title="digit", ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5),
                   fontsize=7, title_fontsize=7, frameon=False)
    utils.save_figure(fig, path)


if __name__ == "__main__":
    utils.run_main(main)
