"""HUJI 67912 Exercise 1, Part 2, Q4: importance-sampled log p(x) of the amortized VAE (Eq. 9).

For each digit, 5 images from the VAE's 5,000 training images and 5 from the test set:
(a) one image per digit with its log p(x), (b) the mean log p(x) per digit, (c) training vs test.

Two estimates per image, both through the same log-sum-exp estimator of Eq. 9 with M samples:
  Eq. 9 as the exercise asks   z_i ~ q(z|x), the encoder's Gaussian;
  Laplace (converged)          z_i ~ N(z*, H^-1), fitted to each image's own posterior: z* the
                               mode of log p(x|z) + log p(z), H = I + J^T J / sigma_p^2.
Per image and estimator: the effective sample size, the Pareto k-hat of the largest weights
(above min(1 - 1/log10 M, 0.7): not trustworthy) and a bootstrap standard deviation. The
top-level answers in metrics.json (most and least likely digit, training against test) are the
converged estimate's; Eq. 9's are under "eq9". The report answers Q4 (a) to (c) by Eq. 9, as
the exercise asks, then says what the converged estimate changes: their difference is a finding
of its own.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import model as vae_model
import utils


# ----------------------------------------------------------------------------------------------
# Eq. 9 with any Gaussian proposal, and its diagnostics
# ----------------------------------------------------------------------------------------------
def gaussian_draw(mean, scale, eps):
    """z = mean + scale eps and log q(z), for q = N(mean, scale scale^T) per image.

    mean (B, d); scale (B, d) standard deviations (a diagonal q, as the encoder's) or (B, d, d) a
    triangular matrix (a full-covariance q, as the Laplace proposal's); eps (m, B, d) ~ N(0, I).
    log q(z) = -d/2 log 2 pi - log|det scale| - |eps|^2 / 2, exact in log space.
    """
    if scale.dim() == mean.dim():
        z = mean + scale * eps
        log_det = scale.log().sum(-1)
    else:
        z = mean + torch.einsum("bij,mbj->mbi", scale, eps)
        log_det = scale.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    log_q = -0.5 * mean.shape[-1] * vae_model.LOG_2PI - log_det - 0.5 * eps.pow(2).sum(-1)
    return z, log_q


@torch.no_grad()
def importance_log_likelihood(x, mean, scale, decode, sigma_p: float, num_samples: int = 1000,
                              chunk_size: int = 4096, generator: torch.Generator | None = None):
    """Eq. 9: log p(x) ~= logsumexp_i [log p(z_i) + log p(x|z_i) - log q(z_i|x)] - log M,
    z_i ~ q(.|x) = N(mean, scale scale^T) (see `gaussian_draw`): the encoder's q (Eq. 9 as the
    exercise asks) or any other Gaussian proposal, e.g. `laplace_proposal`.

    Batched over images and samples; at most `chunk_size` decoder evaluations are in memory at
    once, whatever M and the number of images. Returns a dict of per-image tensors:
      log_px  the estimate of Eq. 9,
      elbo    mean of the same log-weights, an unbiased estimate of the ELBO (Eq. 4),
      ess     effective sample size (sum w)^2 / sum w^2, from 1 (one weight dominates) to M,
      khat    Pareto k-hat of the largest weights (`pareto_khat`); above `khat_threshold`
              the estimate cannot be trusted,
      log_w   the log-weights themselves, (M, images), in sampling order.
    Its Monte-Carlo uncertainty comes from `bootstrap_sd` (or independent repeats), not from a
    delta-method formula, which can never exceed about 1 nat when one weight dominates.
    """
    n_images, latent_dim = mean.shape
    image_block = max(1, min(n_images, chunk_size))
    log_w_blocks = []
    for start in range(0, n_images, image_block):
        xb, mb, sb = (t[start:start + image_block] for t in (x, mean, scale))
        sample_block = max(1, chunk_size // len(xb))
        log_w = []
        for s in range(0, num_samples, sample_block):
            m = min(sample_block, num_samples - s)
            eps = torch.randn((m, *mb.shape), generator=generator, device=mb.device, dtype=mb.dtype)
            z, log_q = gaussian_draw(mb, sb, eps)                                   # (m, B, d)
            x_rep = xb.unsqueeze(0).expand(m, *xb.shape).reshape(m * len(xb), *xb.shape[1:])
            log_p = vae_model.log_joint(x_rep, z.reshape(m * len(xb), latent_dim), decode, sigma_p)
            log_w.append(log_p.reshape(m, len(xb)) - log_q)
        log_w_blocks.append(torch.cat(log_w))                                       # (M, B)
    log_w = torch.cat(log_w_blocks, dim=1)
    return {"log_px": torch.logsumexp(log_w, dim=0) - math.log(num_samples),
            "elbo": log_w.mean(dim=0), "ess": effective_sample_size(log_w),
            "khat": pareto_khat(log_w), "log_w": log_w}


def effective_sample_size(log_w):
    """(sum w)^2 / sum w^2 per column of log-weights (M, images), computed in log space."""
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


def bootstrap_sd(log_w, resamples: int = 1000, seed: int = 0):
    """Standard deviation of logsumexp(log w) - log M over bootstrap resamples of the M weights,
    per image. Unlike the delta method it grows without bound when the estimate hinges on a few
    weights (a resample without the largest weight can fall far); when weights are so degenerate
    that the tail was never sampled no error bar can see it, which is what k-hat is for."""
    m, n = log_w.shape
    gen = torch.Generator(device=log_w.device).manual_seed(seed)
    block = max(1, 2_000_000 // m)          # resamples drawn at once: memory stays bounded
    sds = []
    for j in range(n):
        estimates = torch.cat([
            torch.logsumexp(log_w[torch.randint(m, (min(block, resamples - r), m), generator=gen,
                                                device=log_w.device), j], dim=1)
            for r in range(0, resamples, block)])
        sds.append(estimates.std())
    return torch.stack(sds)


def _generalized_pareto_fit(exceedances: np.ndarray) -> float:
    """Shape k of a generalized Pareto fitted to sorted positive exceedances: the empirical Bayes
    estimate of Zhang & Stephens (2009) with the weak prior of Vehtari et al. (PSIS, 2024)."""
    n = len(exceedances)
    m_est = 30 + int(np.sqrt(n))
    theta = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1) - 0.5))
    theta = theta / (3 * exceedances[int(n / 4 + 0.5) - 1]) + 1 / exceedances[-1]
    k = np.log1p(-theta[:, None] * exceedances).mean(axis=1)
    profile = n * (np.log(-theta / k) - k - 1)
    weights = 1 / np.exp(profile - profile[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(float).eps
    theta, weights = theta[keep], weights[keep] / weights[keep].sum()
    k = np.log1p(-(theta * weights).sum() * exceedances).mean()
    return float((n * k + 10 * 0.5) / (n + 10))     # shrink towards 0.5 with prior weight 10


def pareto_khat(log_w):
    """Pareto k-hat of the importance weights, per column of log-weights (M, images) (PSIS,
    Vehtari et al. 2024): a generalized Pareto fitted to the min(M/5, 3 sqrt(M)) largest
    weights. k < 0.5: the variance of the weights is finite; 0.5 to 0.7: finite but slow;
    above `khat_threshold(M)` (0.67 at M = 1,000, 0.7 from 2,155 on) the estimate cannot be
    trusted. NaN when M is too small to fit a tail (M <= 20)."""
    log_w = torch.as_tensor(log_w).detach().double().cpu().numpy()
    m = log_w.shape[0]
    tail = int(np.ceil(min(0.2 * m, 3 * np.sqrt(m))))
    out = []
    for column in log_w.T:
        if tail < 5:
            out.append(float("nan"))
            continue
        ordered = np.sort(column - column.max())
        threshold = ordered[-tail - 1]
        exceed = np.exp(ordered[-tail:]) - np.exp(threshold)
        # All tail weights equal up to rounding (within a factor 1 + 1e-9: float64 sums leave
        # differences of about 1e-13, on which a tail fit would only describe the rounding): a
        # bounded (flat) tail.
        if exceed[-1] <= 1e-9:
            out.append(-np.inf)
            continue
        exceed = exceed[exceed > 0]
        out.append(_generalized_pareto_fit(exceed) if len(exceed) >= 5 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The converged estimate: a Laplace proposal fitted to each image's posterior
# ----------------------------------------------------------------------------------------------
def decoder_jacobian(decode, z, chunk: int = 25):
    """J = dG(z)/dz per latent, (B, pixels, d), by forward-mode autodiff (d tangents per image)."""
    per_image = lambda zz: decode(zz.unsqueeze(0)).flatten()          # noqa: E731
    with warnings.catch_warnings():     # torch.func's first use warns about torch.jit internals
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        return torch.cat([torch.func.vmap(torch.func.jacfwd(per_image))(zc)
                          for zc in z.split(chunk)])


@torch.no_grad()
def gauss_newton_step(x, z, decode, sigma_p: float):
    """One Gauss-Newton step towards the mode of log p(x|z) + log p(z), per image, with the
    precision H = I + J^T J / sigma_p^2 at z, kept only where it raises log p(x, z) (else the
    step is halved, up to 4 times). Returns the new z."""
    jac = decoder_jacobian(decode, z)
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    chol = torch.linalg.cholesky(eye + jac.transpose(1, 2) @ jac / sigma_p**2)
    resid = (x - decode(z).reshape(x.shape)).reshape(len(x), -1)
    grad = (jac.transpose(1, 2) @ resid.unsqueeze(-1)).squeeze(-1) / sigma_p**2 - z
    step = torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
    current = vae_model.log_joint(x, z, decode, sigma_p)
    for _ in range(5):
        better = vae_model.log_joint(x, z + step, decode, sigma_p) > current
        z = torch.where(better.unsqueeze(1), z + step, z)
        current = torch.maximum(current, vae_model.log_joint(x, z, decode, sigma_p))
        step = torch.where(better.unsqueeze(1), torch.zeros_like(step), step / 2)
    return z


def laplace_proposal(x, decode, sigma_p: float, z_init, adam_steps: int = 100, lr: float = 0.05,
                     newton_steps: int = 2):
    """A Gaussian proposal fitted to each image's posterior p(z|x) (Laplace's method):
    centre = the mode of log p(x|z) + log p(z), found by Adam from z_init (the encoder's mean)
    and then Gauss-Newton steps; precision H = I + J^T J / sigma_p^2 with J the decoder's
    Jacobian at the centre (the Gauss-Newton Hessian; exact for a linear decoder, whose
    posterior is then reproduced exactly). Returns (centre (B, d), scale (B, d, d)) for
    `importance_log_likelihood`: scale = L^-T with H = L L^T, so scale scale^T = H^-1."""
    z = z_init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, adam_steps))
    for _ in range(adam_steps):
        loss = -vae_model.log_joint(x, z, decode, sigma_p).sum()       # images are independent
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    z = z.detach()
    for _ in range(newton_steps):
        z = gauss_newton_step(x, z, decode, sigma_p)
    jac = decoder_jacobian(decode, z)
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    chol = torch.linalg.cholesky(eye + jac.transpose(1, 2) @ jac / sigma_p**2)
    scale = torch.linalg.solve_triangular(chol.transpose(1, 2), eye.expand_as(chol), upper=True)
    return z, scale



def kl_full_to_diagonal(mean1, scale1, mean0, logvar0):
    """KL(N(mean1, S1) || N(mean0, diag(exp(logvar0)))) per image, S1 = scale1 scale1^T, split
    into the part due to the means, (mean0 - mean1)^T S0^-1 (mean0 - mean1) / 2, and the rest
    (the covariances). Importance sampling from the second Gaussian for the first needs about
    exp(KL) samples (Chatterjee & Diaconis 2018). Returns (total, mean part), each (B,)."""
    var0 = logvar0.exp()
    cov1 = scale1 @ scale1.transpose(-1, -2)
    trace = (cov1.diagonal(dim1=-2, dim2=-1) / var0).sum(-1)
    log_det1 = 2 * scale1.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    mean_part = 0.5 * ((mean0 - mean1).pow(2) / var0).sum(-1)
    cov_part = 0.5 * (trace - mean1.shape[-1] + logvar0.sum(-1) - log_det1)
    return cov_part + mean_part, mean_part


# ----------------------------------------------------------------------------------------------
# Q4
# ----------------------------------------------------------------------------------------------
CONVERGENCE_M = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)


def parse_args(argv=None):
    parser = utils.script_parser("log_likelihood", __doc__.splitlines()[0], resumable=False)
    utils.add_file_argument(parser, "--checkpoint", utils.AMORTIZED_VAE,
                            "the amortized VAE written by vae_amortized.py", required=True)
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


@dataclass(frozen=True)
class Sampling:
    """How every estimate is computed: M samples per image, the model's sigma_p, decoder
    evaluations held in memory at once, bootstrap resamples and their seed."""
    num_samples: int
    sigma_p: float
    chunk_size: int
    bootstrap: int
    seed: int


def estimate(x, mean, scale, decoder, sampling: Sampling, generator):
    """Eq. 9 with the proposal N(mean, scale scale^T), plus its bootstrap standard deviation."""
    result = importance_log_likelihood(x, mean, scale, decoder, sampling.sigma_p,
                                       sampling.num_samples, sampling.chunk_size, generator)
    result["sd"] = bootstrap_sd(result["log_w"], sampling.bootstrap, seed=sampling.seed)
    return result


def load_vae(named, quick: bool, per_class: int, device):
    """The amortized VAE to evaluate (`named`, or the --quick or full run's by default),
    checked against the data split it was trained on."""
    checkpoint = utils.input_file(named, utils.AMORTIZED_VAE, quick, required=True)
    vae, _ = vae_model.load_amortized_vae(checkpoint, device, per_class)
    # Channels-last weights: decoding 1,024 latents at a time runs at about 2x the speed on a
    # CPU (tests/benchmark_cpu.py), with the same results up to float rounding.
    vae.decoder.to(memory_format=torch.channels_last)
    return checkpoint, vae


def pick_images(data, per_digit: int, seed: int, device):
    """Q4's images: per_digit training images (from the VAE's own 5,000) and per_digit test
    images of each digit, seeded. Returns (x, digits, splits, MNIST indices)."""
    available = min(int(torch.bincount(labels, minlength=10).min())
                    for labels in (data["train_y"], data["val_y"]))
    if per_digit > available:
        raise utils.UsageError(f"--per-digit {per_digit}: only {available} images of some "
                               f"digit are available; use --per-digit {available} or less")
    pick_train = utils.balanced_subset(data["train_y"], per_digit, seed)
    pick_test = utils.balanced_subset(data["val_y"], per_digit, seed)
    x = torch.cat([data["train_x"][pick_train.to(device)], data["val_x"][pick_test.to(device)]])
    digits = torch.cat([data["train_y"][pick_train], data["val_y"][pick_test]]).tolist()
    split = ["train"] * len(pick_train) + ["test"] * len(pick_test)
    return x, digits, split, data["subset"][pick_train].tolist() + pick_test.tolist()


def both_estimates(x, vae, sampling: Sampling, adam_steps: int, newton_steps: int, generator):
    """Eq. 9 with the encoder's q (as the exercise asks) and with the Laplace proposal, timed.
    Returns (results and proposals, each {eq9, laplace}; the encoder's log-variances; seconds)."""
    stages = tqdm(total=3, desc="Q4: Eq. 9 with the encoder's q", unit="stage")
    t0 = time.perf_counter()
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
    eq9 = estimate(x, mu, torch.exp(0.5 * logvar), vae.decoder, sampling, generator)
    seconds = {"eq9": time.perf_counter() - t0}
    stages.update(1)
    stages.set_description("Q4: Laplace proposal (posterior mode and curvature)")
    t0 = time.perf_counter()
    centre, scale = laplace_proposal(x, vae.decoder, sampling.sigma_p, mu, adam_steps,
                                     newton_steps=newton_steps)
    seconds["laplace_fit"] = time.perf_counter() - t0
    stages.update(1)
    stages.set_description("Q4: Eq. 9 with the Laplace proposal")
    t0 = time.perf_counter()
    lap = estimate(x, centre, scale, vae.decoder, sampling, generator)
    seconds["laplace_estimate"] = time.perf_counter() - t0
    stages.update(1)
    stages.close()
    proposals = {"eq9": (mu, torch.exp(0.5 * logvar)), "laplace": (centre, scale)}
    return {"eq9": eq9, "laplace": lap}, proposals, logvar, seconds


def convergence_in_m(x, digits, split, proposals, decoder, sampling: Sampling, largest_m: int,
                     generator) -> dict:
    """For one test image per digit, one stream of samples per proposal, and the estimate from
    each prefix of it: how far Eq. 9 still moves between M and the largest M."""
    conv_idx = [next(i for i in range(len(x)) if digits[i] == d and split[i] == "test")
                for d in range(10)]
    ms = sorted({m for m in (*CONVERGENCE_M, sampling.num_samples) if m <= largest_m}
                | {largest_m})
    convergence = {"M": ms, "digits": [digits[i] for i in conv_idx], "images": conv_idx}
    for name, (mean, sc) in tqdm(proposals.items(), desc=f"Q4: convergence up to M = "
                                 f"{largest_m:,}", unit="proposal"):
        log_w = importance_log_likelihood(x[conv_idx], mean[conv_idx], sc[conv_idx], decoder,
                                          sampling.sigma_p, largest_m, sampling.chunk_size,
                                          generator)["log_w"].cpu()
        convergence[name] = [[(torch.logsumexp(log_w[:m, j], 0) - math.log(m)).item()
                              for m in ms] for j in range(len(conv_idx))]
    return convergence


def movement(convergence, name, num_samples):
    """How far each image's estimate moves from M = num_samples to the largest M."""
    if num_samples not in convergence["M"]:
        return None
    at = convergence["M"].index(num_samples)
    shifts = [row[-1] - row[at] for row in convergence[name]]
    return {"min": float(min(shifts)), "max": float(max(shifts)),
            "max_abs": float(max(map(abs, shifts)))}


def stream_disagreement(convergence, estimates, num_samples):
    """At M = num_samples, how far each proposal's convergence stream (fresh samples) lands from
    the main estimate of the same image, at most over the images: the sampling noise of one
    estimate, which Figure 9 shows beside Figure 7."""
    if num_samples not in convergence["M"]:
        return None
    at = convergence["M"].index(num_samples)
    return {name: float(max(abs(row[at] - estimates[name]["log_px"][i].item())
                            for row, i in zip(convergence[name], convergence["images"])))
            for name in ("laplace", "eq9")}


def proposal_width(scale, logvar) -> dict:
    """Why Eq. 9's weights degenerate: the encoder's variances against the fitted posterior's,
    its marginal variances diag(H^-1) and its conditional ones 1 / diag(H), as geometric means
    over images and latent dimensions. A diagonal q wider than the marginals wastes samples;
    one narrower than them (what fitting a diagonal q to a correlated posterior by KL(q || p)
    gives) has heavy-tailed weights."""
    cov_l = scale @ scale.transpose(1, 2)
    log_q_var, log_marginal = logvar.double(), cov_l.diagonal(dim1=1, dim2=2).double().log()
    log_conditional = -torch.linalg.inv(cov_l.double()).diagonal(dim1=1, dim2=2).log()
    return {"vs_marginal": (log_q_var - log_marginal).mean().exp().item(),
            "vs_conditional": (log_q_var - log_conditional).mean().exp().item(),
            "share_narrower_than_marginal": (log_q_var < log_marginal).double().mean().item(),
            "correlation_inflation": (log_marginal - log_conditional).mean().exp().item()}


def per_image_rows(estimates, digits, split, ink, index) -> list:
    lap, eq9 = estimates["laplace"], estimates["eq9"]
    return [{"digit": digits[k], "split": split[k], "ink": int(ink[k]), "index": int(index[k]),
             "log_px": float(lap["log_px"][k]), "sd": float(lap["sd"][k]),
             "ess": float(lap["ess"][k]), "khat": finite_or_none(lap["khat"][k]),
             "eq9_log_px": float(eq9["log_px"][k]), "eq9_sd": float(eq9["sd"][k]),
             "eq9_ess": float(eq9["ess"][k]), "eq9_khat": finite_or_none(eq9["khat"][k]),
             "eq9_elbo": float(eq9["elbo"][k]),
             "gap": float(lap["log_px"][k] - eq9["log_px"][k])} for k in range(len(digits))]


def plot_examples(path, x, digits, split, lap_px, eq9_px) -> None:
    """(a) one training and one test image per digit: Eq. 9's log p(x) (what (a) asks for), the
    Laplace estimate below it in parentheses."""
    first = {s: [next(i for i in range(len(x)) if digits[i] == d and split[i] == s)
                 for d in range(10)] for s in ("train", "test")}
    utils.plot_image_rows(
        path, [x[first["train"]], x[first["test"]]], ["training", "test"],
        cell_titles=[[f"{eq9_px[i]:.0f}\n({lap_px[i]:.0f})".replace("-", "\u2212")
                      for i in first[s]] for s in ("train", "test")], width=utils.PAGE_WIDTH)


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


def peak_memory_mb():
    """This process's peak resident memory in MB, where the platform reports it (not Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, else KB


def finite_or_none(value):
    """JSON has no NaN or infinity: k-hat is NaN when M is too small to fit a tail (None here)
    and -inf for exactly equal weights, a bounded tail (written as -1e9: any k below 0 means
    a bounded tail)."""
    value = float(value)
    return value if math.isfinite(value) else (None if math.isnan(value) else max(value, -1e9))


def khat_threshold(num_samples: int) -> float | None:
    """The k-hat above which an estimate from num_samples draws is unreliable, by the current
    PSIS rule (Vehtari et al. 2024; R package loo >= 2.7): min(1 - 1/log10 S, 0.7), so 0.67 at
    S = 1,000 and 0.7 from S = 2,155 on. None for S <= 10, where the rule has no positive
    limit (and k-hat, which needs 21 draws or more, is not fitted anyway)."""
    return min(1 - 1 / math.log10(num_samples), 0.7) if num_samples > 10 else None


def diagnostics(result, num_samples: int) -> dict:
    ess, khat, sd = (result[k].cpu().numpy() for k in ("ess", "khat", "sd"))
    fitted = khat[~np.isnan(khat)]       # k-hat needs M >= 21 (a tail of 5 draws)
    threshold = khat_threshold(num_samples)
    return {"median_ess": float(np.median(ess)), "min_ess": float(ess.min()),
            "share_ess_below_2": float((ess < 2).mean()),
            "median_khat": finite_or_none(np.median(fitted)) if len(fitted) else None,
            "khat_threshold": threshold,
            "share_khat_above_threshold": (float((fitted > threshold).mean())
                                           if len(fitted) and threshold is not None else None),
            "median_sd": float(np.median(sd)), "max_sd": float(sd.max())}


def trust(diag: dict) -> str:
    """Can an estimate be trusted, by the current PSIS rule? "no" when k-hat exceeds the
    threshold for M for at least half of the images, "partly" for some, "yes" for none
    (without a k-hat, at M <= 20, by the median effective sample size: below 10 is "no")."""
    share = diag["share_khat_above_threshold"]
    if share is None:
        return "no" if diag["median_ess"] < 10 else "yes"
    return "no" if share >= 0.5 else ("partly" if share > 0 else "yes")


def agreement(converged: dict, exercise: dict) -> dict:
    """Do Eq. 9's answers to (b) and (c) agree with the converged estimate's? And where the most
    or least likely digit changes, is the change between digits tied under both estimates?"""
    same = {end: exercise[f"{end}_likely_digit"] == converged[f"{end}_likely_digit"]
            for end in ("most", "least")}
    return {"most": same["most"], "least": same["least"],
            "train_vs_test": exercise["train_vs_test"] == converged["train_vs_test"],
            "changes_within_ties": all(
                same[end] or (converged[f"{end}_likely_digit"] in exercise[f"{end}_likely_tied_with"]
                              and exercise[f"{end}_likely_digit"]
                              in converged[f"{end}_likely_tied_with"])
                for end in ("most", "least"))}


def answers(estimates, digits, split) -> dict:
    """Q4 (b) and (c) from the converged estimate, the same from Eq. 9 beside them, and the gap
    between the two, per image and per digit."""
    lap_px, eq9_px = (estimates[k]["log_px"].cpu().numpy() for k in ("laplace", "eq9"))
    gap = lap_px - eq9_px
    converged, exercise = summarize(lap_px, digits, split), summarize(eq9_px, digits, split)
    for d in range(10):
        converged["per_digit"][str(d)]["eq9_mean"] = exercise["per_digit"][str(d)]["mean"]
        converged["per_digit"][str(d)]["gap_mean"] = float(gap[np.asarray(digits) == d].mean())
        converged["per_digit"][str(d)]["eq9_se"] = exercise["per_digit"][str(d)]["se"]
    return {**converged,                          # Q4 (b), (c) from the converged estimate
            "eq9": exercise,                      # the same from Eq. 9 with the encoder's q
            "agreement": agreement(converged, exercise),
            "gap": {"mean": float(gap.mean()), "median": float(np.median(gap)),
                    "max": float(gap.max()), "min": float(gap.min())}}


def why_eq9_degenerates(proposals, logvar, num_samples: int) -> dict:
    """The encoder's q against each image's fitted posterior: its widths, and KL(posterior ||
    q), for which importance sampling needs about exp(KL) samples (against log M)."""
    (centre, scale), (mu, _) = proposals["laplace"], proposals["eq9"]
    kl, kl_mean = kl_full_to_diagonal(centre.double(), scale.double(), mu.double(),
                                      logvar.double())
    return {"q_width": proposal_width(scale, logvar),
            "proposal_mismatch": {"kl_median": kl.median().item(),
                                  "kl_mean_part_median": kl_mean.median().item(),
                                  "kl_min": kl.min().item(), "log_M": math.log(num_samples)}}


def most_ink(ink_per_digit: dict, log_px_per_digit: dict) -> dict:
    """Q4 (b): the digit with the most ink and its rank by mean log p(x) (1 = most likely),
    which says whether it bends the argument that little ink makes an image likely."""
    digit = max(ink_per_digit, key=ink_per_digit.get)
    rank = 1 + sum(v > log_px_per_digit[digit] for v in log_px_per_digit.values())
    return {"digit": int(digit), "lit_pixels": ink_per_digit[digit], "rank": rank}


def plot_per_digit(path, per_digit):
    """Both estimates' mean log p(x) per digit, each with its error bar (one standard error)."""
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(utils.HALF_WIDTH, 2.2))
    d = np.arange(10)
    ax.bar(d - 0.2, [per_digit[str(i)]["mean"] for i in d], 0.4,
           yerr=[per_digit[str(i)]["se"] for i in d], color="#2e6da4", capsize=2,
           error_kw={"lw": 0.8}, label="Laplace estimate")
    ax.bar(d + 0.2, [per_digit[str(i)]["eq9_mean"] for i in d], 0.4, color="#c9a227",
           yerr=[per_digit[str(i)].get("eq9_se", 0) for i in d], capsize=2,
           error_kw={"lw": 0.8}, label="Eq. 9")
    ax.set_xticks(d)
    ax.set_xlabel("digit")
    ax.set_ylabel(r"mean $\log p(x)$ [nats]")
    ax.grid(axis="y", alpha=0.3)
    # The bars hang down from 0 to about -400: the legend goes above the axes, never on a bar.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False,
              title="bars: mean; whiskers: \u00b1 1 standard error", title_fontsize=8)
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
        # Symmetric log: Eq. 9's misses of hundreds of nats at M = 1 and its last few nats near
        # M = 1,000 in one panel (linear within 1 nat of the reference).
        ax.set_yscale("symlog", linthresh=1.0)
        # plain numbers (-100, -10, 0, 10) at the body text's size, not small powers of ten
        ax.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}".replace("-", "\u2212"))
        ax.set_ymargin(0.08)              # the extreme points whole, not cut by the frame
        ax.set_xlabel("importance samples M")
        ax.set_ylabel("estimate minus reference [nats]")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    # Beside the axes, not on them: the lines may end anywhere in the panel.
    axes[1].legend(title="digit", ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5),
                   title_fontsize=8, frameon=False)
    utils.save_figure(fig, path)


def main(run: utils.Run, argv=None):
    args = parse_args(argv)
    device = utils.device_and_seeds(args.device, args.seed)
    checkpoint, vae = load_vae(args.checkpoint, args.quick, args.per_class, device)
    data = utils.vae_data(args.per_class, args.val_images, device)
    x, digits, split, index = pick_images(data, args.per_digit, args.seed, device)
    out = run.claim(args.out)

    # Eq. 9 with the encoder's q and with the Laplace proposal, then both against M
    sampling = Sampling(args.num_samples, args.sigma_p, args.chunk_size, args.bootstrap, args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    estimates, proposals, logvar, seconds = both_estimates(x, vae, sampling, args.adam_steps,
                                                           args.newton_steps, generator)
    t0 = time.perf_counter()
    convergence = convergence_in_m(x, digits, split, proposals, vae.decoder, sampling,
                                   args.convergence_max, generator)
    seconds["convergence"] = time.perf_counter() - t0

    result = answers(estimates, digits, split)
    lap_px, eq9_px = (estimates[k]["log_px"].cpu().numpy() for k in ("laplace", "eq9"))
    ink = (x > -1).flatten(1).sum(1).cpu().numpy()       # lit pixels (above the background)
    ink_per_digit = {str(d): float(ink[np.asarray(digits) == d].mean()) for d in range(10)}
    diag = {k: diagnostics(estimates[k], args.num_samples) for k in ("laplace", "eq9")}
    metrics = {
        "images": per_image_rows(estimates, digits, split, ink, index), **result,
        "diagnostics": diag, "trust": {k: trust(d) for k, d in diag.items()},
        **why_eq9_degenerates(proposals, logvar, args.num_samples),
        "convergence": convergence,
        "convergence_movement": {k: movement(convergence, k, args.num_samples)
                                 for k in ("laplace", "eq9")},
        "stream_disagreement": stream_disagreement(convergence, estimates, args.num_samples),
        "ink_correlation": float(np.corrcoef(ink, lap_px)[0, 1]),
        "eq9_ink_correlation": float(np.corrcoef(ink, eq9_px)[0, 1]),
        "ink_per_digit": ink_per_digit,
        "most_ink": most_ink(ink_per_digit, {d: v["eq9_mean"] for d, v in
                                              result["per_digit"].items()}),
        "num_samples": args.num_samples, "sigma_p": args.sigma_p, "latent_dim": vae.latent_dim,
        "seconds": seconds,
        "estimate_seconds": seconds["eq9"] + seconds["laplace_fit"] + seconds["laplace_estimate"],
        "peak_rss_mb": peak_memory_mb(),           # the whole process, data loading included
        "checkpoint": str(checkpoint), **utils.run_facts(run, device, args),
    }
    plot_examples(out / "q4_log_px_examples.png", x, digits, split, lap_px, eq9_px)
    plot_per_digit(out / "q4_log_px_per_digit.png", result["per_digit"])
    plot_convergence(out / "q4_convergence.png", convergence, args.num_samples)
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"{len(x)} images, M = {args.num_samples}: {metrics['estimate_seconds']:.1f} s. "
          f"Most likely digit {result['most_likely_digit']}; train "
          f"{result['train_mean']:.1f} vs test {result['test_mean']:.1f} nats (Laplace); "
          f"Eq. 9 minus Laplace {-metrics['gap']['mean']:+.1f} on average; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
