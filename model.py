"""The course's convolutional VAE and the model's densities (HUJI Exercise 1, Sec. 3.1).

Pixels are in [-1, 1] and the decoder has no output activation, as in the course's model.py.
Every density is computed in log space; equation numbers refer to the exercise text.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class PatchConv2d(nn.Conv2d):
    """An nn.Conv2d (the same parameters, the same result up to float rounding) computed as the
    matrix product it is: each output pixel's k x k input patch, all channels, times the weight,
    (N Ho Wo, C k k) @ (C k k, C_out), with the bias added in the same call (addmm).

    Why: for the 1-channel images the product has only C k k = 9 terms per output, where the
    direct convolution kernels (tuned for many channels) are slow. Measured on the encoder's
    1 -> 32 layer, forward and backward, one thread (tests/benchmark_cpu.py): with AVX2
    1.15 ms instead of 1.91 at batch 64 and 2.28 instead of 4.24 at batch 128; with AVX-512 about
    the same (1.06 against 0.95 ms). Its output is channels-last, the layout in which the next
    convolutions run fastest (the encoder's 32 -> 64 layer: 5.9 instead of 6.7 ms on AVX2)."""

    def forward(self, x):
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" \
                or isinstance(self.padding, str):
            return super().forward(x)                       # a case this layer does not cover
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c = x.shape[:2]
        padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)            # (N, H, W, C)
        patches = padded.unfold(1, kh, sh).unfold(2, kw, sw)              # (N, Ho, Wo, C, kh, kw)
        ho, wo = patches.shape[1:3]
        rows = patches.reshape(n * ho * wo, c * kh * kw)
        weight = self.weight.reshape(self.out_channels, c * kh * kw).t()
        out = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)
        return out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)


class MatmulConvTranspose2d(nn.ConvTranspose2d):
    """An nn.ConvTranspose2d (the same parameters, the same result up to float rounding)
    computed as its definition: each input pixel's channel vector times the weight,
    (N H W, C_in) @ (C_in, C_out kh kw), gives one kh x kw patch of output per input pixel; the
    patches, placed `stride` apart, are summed into the output (F.fold, i.e. col2im), and the
    bias is added. On a 1x1 input (the decoder's first layer) the one patch is the output, and
    the layer is a single matmul, like a Linear.

    Why: for the thin layers one large matmul plus a memory-bound fold beats the transposed-
    convolution kernels: the 1x1 -> 2x2 layer (a matmul the kernels treat as a 1-pixel
    convolution) and the 32 -> 1 output layer, whose single output channel leaves the kernels'
    vector lanes empty. Measured, one thread (tests/benchmark_cpu.py), AVX2 / AVX-512:
    1x1 -> 2x2, batch 64 forward and backward, 0.96 / 0.87 ms instead of 3.62 / 2.10; Q4's
    1,024 latents, forward, 2.5 / 1.2 ms instead of 8.0 / 3.9. 32 -> 1, batch 64, 2.5 / 1.7 ms
    instead of 6.0 / 3.2; Q4, 10.2 / 9.8 ms instead of 30.7 / 25.5. For the middle layers
    (64 to 128 channels) the kernels are as fast or faster, so they stay nn.ConvTranspose2d."""

    def forward(self, x, output_size=None):
        if output_size is not None or self.groups != 1 or self.dilation != (1, 1) \
                or self.padding_mode != "zeros":
            return super().forward(x, output_size)          # a case this layer does not cover
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)     # free when x is channels-last
        bias = self.bias.view(1, -1, 1, 1) if self.bias is not None else 0.0
        if h == w == 1 and (ph, pw) == (0, 0) and self.output_padding == (0, 0):
            # One patch per image: the weight is read in (kh, kw, C_out) order, so that the
            # output comes out channels-last, the layout the next layers run fastest in.
            out = pixels @ self.weight.permute(0, 2, 3, 1).reshape(c, -1)
            return out.view(n, kh, kw, self.out_channels).permute(0, 3, 1, 2) + bias
        size = ((h - 1) * sh - 2 * ph + kh + self.output_padding[0],
                (w - 1) * sw - 2 * pw + kw + self.output_padding[1])
        patches = pixels @ self.weight.reshape(c, -1)            # (N H W, C_out kh kw)
        out = F.fold(patches.view(n, h * w, -1).transpose(1, 2), size, (kh, kw),
                     padding=(ph, pw), stride=(sh, sw))
        return out + bias


class Encoder(nn.Module):
    """S: image (N, 1, 28, 28) -> (mu, r = log sigma^2), each (N, d)."""

    def __init__(self, latent_dim: int = 200):
        super().__init__()
        self.conv = nn.Sequential(
            PatchConv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),  # 28 -> 14
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 14 -> 7
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),  # 7 -> 4
            nn.Conv2d(128, 128, 2),                                 # 4 -> 3
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.mu = nn.Linear(128, latent_dim)
        self.logvar = nn.Linear(128, latent_dim)

    def forward(self, x):
        h = self.conv(x)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """G: latent (N, d) -> mean image (N, 1, 28, 28). The Linear d -> 128 stays (the exercise
    asks not to remove it)."""

    def __init__(self, latent_dim: int = 200):
        super().__init__()
        self.latent_dim = latent_dim
        self.fc = nn.Linear(latent_dim, 128)
        self.deconv = nn.Sequential(
            MatmulConvTranspose2d(128, 128, 2), nn.ReLU(),                                # 1 -> 2
            nn.ConvTranspose2d(128, 128, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # 4
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1), nn.ReLU(),                # 4 -> 7
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),   # 14
            MatmulConvTranspose2d(32, 1, 3, stride=2, padding=1, output_padding=1),        # 28
        )

    def forward(self, z):
        return self.deconv(self.fc(z).view(-1, 128, 1, 1))


class VAE(nn.Module):
    """Amortized VAE: encoder S, reparameterized sample, decoder G (Eq. 5)."""

    def __init__(self, latent_dim: int = 200):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(latent_dim)
        self.decoder = Decoder(latent_dim)

    def forward(self, x):
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar)
        return self.decoder(z), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x):
        """Decode the mean of q(z|x) (no sampling noise)."""
        return self.decoder(self.encoder(x)[0])


def build_classifier(width: int = 16) -> nn.Module:
    """Part 1's CNN: one cheap conv-BN-ReLU block at full resolution, the depth at 14x14 and 7x7
    where it costs less, global max-pool, dropout 0.2 (70,330 parameters at width 16)."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, width), nn.MaxPool2d(2),                                        # 28 -> 14
        *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),  # 14 -> 7
        *block(2 * width, 4 * width), *block(4 * width, 4 * width),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width, 10),
    )


# ----------------------------------------------------------------------------------------------
# Saving and loading the trained networks
# ----------------------------------------------------------------------------------------------
def save_snapshot(path, module, epoch: int, latent_dim: int, kind: str, **extra) -> None:
    """A network's weights with what is needed to rebuild it (kind, latent size), atomically."""
    utils.save_checkpoint({"model": module.state_dict(), "epoch": epoch,
                           "latent_dim": latent_dim, "kind": kind, **extra}, path)


def read_snapshot(path, kind: str, map_location="cpu") -> dict:
    """A snapshot written by `save_snapshot`, checked to be of the given kind."""
    advice = f"pass a file written by {kind}.py, or run {kind}.py again"
    ckpt = utils.load_checkpoint(path, map_location, advice=advice)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or "model" not in ckpt \
            or not isinstance(ckpt.get("latent_dim"), int) or ckpt["latent_dim"] <= 0:
        raise utils.CheckpointError(f"{path} is not a {kind} checkpoint; {advice}")
    return ckpt


def load_snapshot(path, module, kind: str, map_location="cpu") -> dict:
    """Load a snapshot into an existing module, with one-line errors for a file of another kind
    or another latent size."""
    ckpt = read_snapshot(path, kind, map_location)
    if ckpt["latent_dim"] != module.latent_dim:
        raise utils.CheckpointError(f"{path} has latent size {ckpt['latent_dim']}, this model "
                                    f"{module.latent_dim}; pass the matching --latent-dim")
    utils.load_state_dict_checked(module, ckpt["model"], path,
                                  advice=f"pass a file written by {kind}.py")
    return ckpt


def load_amortized_vae(path, device="cpu") -> VAE:
    """The amortized VAE written by vae_amortized.py, rebuilt at its own latent size, in eval
    mode with gradients off (it is only evaluated). Its random initialization, overwritten by
    the file, draws from a forked RNG, so a script's results do not depend on what it loads."""
    ckpt = read_snapshot(path, "vae_amortized", device)
    with torch.random.fork_rng(devices=[]):     # loading must not shift the caller's RNG
        vae = VAE(ckpt["latent_dim"]).to(device)
    utils.load_state_dict_checked(vae, ckpt["model"], path,
                                  advice="pass a file written by vae_amortized.py")
    vae.subset_per_class = ckpt.get("subset_per_class")    # its training subset (None: older file)
    return vae.eval().requires_grad_(False)


def load_classifier(path, device="cpu") -> nn.Module:
    """Part 1's classifier from sup_classification.py's classifier.pt, in eval mode."""
    with torch.random.fork_rng(devices=[]):     # loading must not shift the caller's RNG
        classifier = build_classifier().to(device)
    advice = "pass the classifier.pt written by sup_classification.py, or run it again"
    utils.load_state_dict_checked(classifier, utils.load_checkpoint(path, device, advice=advice),
                                  path, advice=advice)
    return classifier.eval().requires_grad_(False)


def optional_classifier(path, device="cpu"):
    """The Part 1 classifier for judging samples: from `path` if given (it must load), else from
    outputs/sup_classification/classifier.pt if that exists, else None (with a note)."""
    if path is not None:
        return load_classifier(path, device)
    default = utils.OUTPUTS_DIR / "sup_classification" / "classifier.pt"
    if default.is_file():
        return load_classifier(default, device)
    print(f"note: {default} not found; run sup_classification.py first to judge prior samples")
    return None


@torch.no_grad()
def classify_samples(classifier, images) -> dict:
    """How a set of generated images looks to the Part 1 classifier: the share of each predicted
    digit, its entropy in bits (log2 10 = 3.32 for all digits equally), the digits with at least
    2 % of the samples, and the mean confidence (largest softmax probability)."""
    probs = torch.cat([torch.softmax(classifier(b), dim=1) for b in images.split(500)])
    share = torch.bincount(probs.argmax(1), minlength=10).double() / len(images)
    nonzero = share[share > 0]
    return {"share": share.tolist(), "entropy_bits": float(-(nonzero * nonzero.log2()).sum()) + 0.0,
            "digits_covered": int((share >= 0.02).sum()),
            "mean_confidence": float(probs.max(1).values.mean())}


# ----------------------------------------------------------------------------------------------
# Densities
# ----------------------------------------------------------------------------------------------
def sigma_from_logvar(logvar):
    """r = log sigma^2  ->  sigma = exp(r / 2)."""
    return torch.exp(0.5 * logvar)


def reparameterize(mu, logvar, eps=None):
    """Sec. 3.1.4: z = mu + sigma * eps with eps ~ N(0, I), a fresh eps per call unless given."""
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + sigma_from_logvar(logvar) * eps


def kl_std_normal(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dimension (elementwise):
    1/2 (mu^2 + sigma^2 - 1 - log sigma^2).

    This is the correct closed form (Uppsala Q3.5). The HUJI text's Eq. 7 prints
    mu^2 + sigma^2 - log sigma - 1, which equals 2 KL + log sigma and is minimized at
    sigma^2 = 1/2 instead of 1; see `kl_eq7_as_printed`.
    """
    return 0.5 * (mu.pow(2) + torch.exp(logvar) - 1.0 - logvar)


def kl_eq7_as_printed(mu, logvar):
    """HUJI Eq. 7 exactly as printed, mu^2 + sigma^2 - log sigma - 1 (kept only as evidence that
    it is not the KL; never used for training)."""
    return mu.pow(2) + torch.exp(logvar) - 0.5 * logvar - 1.0


def aggregate_posterior_kl(mu, logvar) -> float:
    """How far the latents a decoder was trained on are from the prior it is sampled with: the
    aggregate posterior (1/N) sum_i N(mu_i, diag sigma_i^2) moment-matched to N(m, S), with
    S = Cov(mu_i) + mean_i diag(sigma_i^2), and KL(N(m, S) || N(0, I)) =
    (tr S + |m|^2 - d - log det S) / 2 in nats (0 when the moments match the prior's)."""
    mu, logvar = mu.detach().double().cpu(), logvar.detach().double().cpu()
    cov = torch.cov(mu.T) + torch.diag(logvar.exp().mean(0))
    mean = mu.mean(0)
    return 0.5 * (torch.trace(cov) + mean @ mean - len(mean) - torch.logdet(cov)).item()


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


def log_normal_pdf(x, mean, logvar, event_dims: int = 1):
    """log N(x; mean, diag(exp(logvar))), summed over the last `event_dims` dimensions.

    Computed entirely in log space (the hint of Sec. 3.1.6): no density is ever exponentiated,
    so tiny or huge variances give finite values. `logvar` may be a tensor or a float and
    broadcasts against x.
    """
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device)
    elementwise = -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))
    if event_dims == 0:
        return elementwise
    return elementwise.sum(dim=tuple(range(-event_dims, 0)))


def vae_loss(x, x_hat, mu, logvar, objective: str = "exercise", sigma_p: float = 0.4):
    """The training loss and, for monitoring, its two parts in the exercise's units. Returns
    (loss, mse, kl) with mse the pixel-mean squared error and kl the dimension-mean KL.

    objective="exercise": Eq. 5/6 aggregated as Sec. 3.2 asks, the MSE averaged over pixels
      (torch.nn.MSELoss) plus the KL averaged over latent dimensions, averaged over the batch.
      Up to a factor this is the negative ELBO of a decoder with sigma^2 = pixels / (2 d)
      (1.96 for 784 pixels and d = 200), not of the sigma_p model that Eq. 9 evaluates.
    objective="elbo": the negative ELBO of the sigma_p model itself (Eq. 4 without constants),
      sum of squared errors / (2 sigma_p^2) + summed KL, per image, averaged over the batch.
    """
    mse = F.mse_loss(x_hat, x)
    kl_per_dim = kl_std_normal(mu, logvar)
    kl = kl_per_dim.mean()
    if objective == "exercise":
        return mse + kl, mse, kl
    if objective == "elbo":
        sq_err = (x_hat - x).pow(2).flatten(1).sum(1)
        return (sq_err / (2 * sigma_p**2) + kl_per_dim.sum(1)).mean(), mse, kl
    raise ValueError(f"unknown objective {objective!r}: use 'exercise' or 'elbo'")


# ----------------------------------------------------------------------------------------------
# Importance-sampled log-likelihood (Sec. 3.1.6)
# ----------------------------------------------------------------------------------------------
def log_joint(x, z, decode, sigma_p: float):
    """log p(z) + log p(x|z) of the model: p(z) = N(0, I), p(x|z) = N(G(z), sigma_p^2 I)."""
    x_mean = decode(z).reshape(x.shape)
    return (log_normal_pdf(z, 0.0, 0.0)
            + log_normal_pdf(x, x_mean, 2.0 * math.log(sigma_p), event_dims=x.dim() - 1))


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
    log_q = -0.5 * mean.shape[-1] * LOG_2PI - log_det - 0.5 * eps.pow(2).sum(-1)
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
      khat    Pareto k-hat of the largest weights (`pareto_khat`); above 0.7 the estimate
              cannot be trusted,
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
            log_p = log_joint(x_rep, z.reshape(m * len(xb), latent_dim), decode, sigma_p)
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
    > 0.7: the estimate cannot be trusted. NaN when M is too small to fit a tail (M < 25)."""
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
        if exceed[-1] <= 0:                 # all tail weights equal: a bounded (flat) tail
            out.append(-np.inf)
            continue
        exceed = exceed[exceed > 0]
        out.append(_generalized_pareto_fit(exceed) if len(exceed) >= 5 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


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
    current = log_joint(x, z, decode, sigma_p)
    for _ in range(5):
        better = log_joint(x, z + step, decode, sigma_p) > current
        z = torch.where(better.unsqueeze(1), z + step, z)
        current = torch.maximum(current, log_joint(x, z, decode, sigma_p))
        step = torch.where(better.unsqueeze(1), torch.zeros_like(step), step / 2)
    return z


def laplace_proposal(x, decode, sigma_p: float, z_init, adam_steps: int = 100, lr: float = 0.05,
                     newton_steps: int = 3):
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
        loss = -log_joint(x, z, decode, sigma_p).sum()       # images are independent
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


# ----------------------------------------------------------------------------------------------
# Training helpers shared by the amortized (Q1) and latent-optimization (Q3) VAEs
# ----------------------------------------------------------------------------------------------
def vae_epoch(decoder, posterior, x, batch_size, optimizers, progress=None, **loss_kwargs):
    """One training pass over the images x in shuffled batches, with the loss of Eq. 5/6
    (`vae_loss`) and a fresh eps per image per step.

    posterior(idx, x[idx]) -> (mu, logvar) is the encoder (amortized, Eq. 5) or a lookup in the
    per-image latent tables (latent optimization, Eq. 6). Returns the averages of loss, mse and
    kl over the epoch (a running average: the weights change while it is computed).
    """
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
    for idx in torch.randperm(len(x), device=x.device).split(batch_size):
        mu, logvar = posterior(idx, x[idx])
        loss, mse, kl = vae_loss(x[idx], decoder(reparameterize(mu, logvar)), mu, logvar,
                                 **loss_kwargs)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        for key, value in zip(sums, (loss, mse, kl)):
            sums[key] += value.item() * len(idx)
        if progress is not None:
            progress.update(1)
    return {key: value / len(x) for key, value in sums.items()}


@torch.no_grad()
def vae_evaluate(decoder, posterior, x, batch_size=500, **loss_kwargs):
    """The loss of Eq. 5/6 with a sampled z (and its mse and kl parts), and the reconstruction
    MSE with the mean of q, from one pass over x (posterior as in `vae_epoch`). Averages over
    images."""
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0, "recon_mse": 0.0}
    for idx in torch.arange(len(x), device=x.device).split(batch_size):
        xb = x[idx]
        mu, logvar = posterior(idx, xb)
        loss, mse, kl = vae_loss(xb, decoder(reparameterize(mu, logvar)), mu, logvar,
                                 **loss_kwargs)
        recon = F.mse_loss(decoder(mu), xb)
        for key, value in zip(sums, (loss, mse, kl, recon)):
            sums[key] += value.item() * len(xb)
    return {key: value / len(x) for key, value in sums.items()}


@torch.no_grad()
def reconstruction_mse(decoder, mu, x, batch_size=1000):
    """Mean squared error per pixel of decoder(mu) against x: the reconstruction error with the
    mean of q, free of sampling noise."""
    total = 0.0
    for mb, xb in zip(mu.split(batch_size), x.split(batch_size)):
        total += F.mse_loss(decoder(mb), xb, reduction="sum").item()
    return total / x.numel()


QUALITY_SAMPLES, QUALITY_SEED = 1000, 12345     # prior samples judged by the Part 1 classifier


def prior_latents(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """n latents from p(z) = N(0, I), drawn with their own generator so that Q2 and Q3 decode the
    very same latents (and the sample-quality measurements of both use the same 1,000)."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


def fit_latents(decoder, x, steps: int, lr: float, init_seed: int, progress=None):
    """Test-time latent optimization: with the decoder frozen, fit each image's own mu and
    r = log sigma^2 by Adam on the loss of Eq. 6 (initialized as in Q3: mu ~ N(0, I),
    sigma ~ N(0, I)). Returns (mu, logvar)."""
    mu, logvar = init_latents(len(x), decoder.latent_dim, init_seed, device=x.device)
    mu, logvar = mu.requires_grad_(), logvar.requires_grad_()
    opt = torch.optim.Adam([mu, logvar], lr=lr)
    trainable = [p for p in decoder.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            loss, _, _ = vae_loss(x, decoder(reparameterize(mu, logvar)), mu, logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress.update(1)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return mu.detach(), logvar.detach()


def init_latents(n: int, latent_dim: int, seed: int, device=None):
    """Q3's initialization: mu ~ N(0, I) and r = log sigma^2 with sigma ~ N(0, I). sigma^2 is
    floored at 1e-8 so that a draw of exactly 0 cannot give log 0 = -inf."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, latent_dim, generator=gen)
    sigma = torch.randn(n, latent_dim, generator=gen)
    logvar = torch.log(sigma.pow(2).clamp_min(1e-8))
    return mu.to(device), logvar.to(device)
