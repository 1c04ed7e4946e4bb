"""The course's networks and the model's densities and losses (HUJI Exercise 1, Sec. 3.1).

The convolutional VAE (encoder S and decoder G, which also work separately) and Part 1's
classifier; saving and loading them; the densities (reparameterization, KL, log-pdf, the model's
log p(x, z)) and the losses of Eq. 5 and 6. Pixels are in [-1, 1] and the decoder has no output
activation, as in the course's model.py. Every density is computed in log space; equation
numbers refer to the exercise text.
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# Networks. Read PatchConv2d and PooledConv2d as nn.Conv2d, and the Matmul...ConvTranspose2d layers
# as nn.ConvTranspose2d: the same parameters and results, computed faster on a CPU (the "Faster
# layers" at the end of this file; PooledConv2d also takes the global average pool that follows it).
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """S: image (N, 1, 28, 28) -> (mu, r = log sigma^2), each (N, d)."""

    def __init__(self, latent_dim: int = 200):
        super().__init__()
        self.conv = nn.Sequential(
            PatchConv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),  # 28 -> 14
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 14 -> 7
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),  # 7 -> 4
            PooledConv2d(128, 128, 2),                              # 4 -> 3, averaged
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                  # (a no-op on 1 x 1)
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
            MatmulConvTranspose2d(128, 128, 2), nn.ReLU(),                               # 1 -> 2
            MatmulGradConvTranspose2d(128, 128, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),                                                                   # 2 -> 4
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1), nn.ReLU(),              # 4 -> 7
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(),                                                                   # 7 -> 14
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
    """A network's weights with what is needed to rebuild it (kind, latent size), atomically.
    Weights that are not finite (a diverged run) are refused: the file there stays as it was."""
    if not utils.weights_finite(module):
        raise utils.UsageError(f"training diverged by epoch {epoch}: its weights are not finite, so "
                               f"{path} is not written; lower --lr, or run with --fresh")
    utils.save_checkpoint({"model": module.state_dict(), "epoch": epoch,
                           "latent_dim": latent_dim, "kind": kind, **extra}, path)


# A script reading back the snapshots its own run wrote: only training again makes them.
OWN_SNAPSHOT = "this run wrote it earlier: run the same command with --fresh to train again"


def read_snapshot(path, kind: str, map_location="cpu", advice: str | None = None) -> dict:
    """A snapshot written by `save_snapshot`, checked field by field like a flag: its kind, an
    epoch and a latent size in the ranges the scripts accept, and (where present) the training
    subset's size and the latent tables' shapes. `advice` ends a one-line error (default: for
    a file the user named)."""
    advice = advice or f"pass a file written by {kind}.py, or run {kind}.py again"
    ckpt = utils.load_checkpoint(path, map_location, advice=advice)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise utils.CheckpointError(f"{path} is not a {kind} checkpoint; {advice}")
    fields = {"model": utils.kind_field(dict), "epoch": utils.int_field(1, 10_000),
              "latent_dim": utils.int_field(1, 1024)}
    utils.check_fields(ckpt, path, fields, advice)
    optional = {"subset_per_class": utils.int_field(1, utils.MAX_PER_CLASS),
                "mu": utils.tensor_field(None, ckpt["latent_dim"]),
                "logvar": utils.tensor_field(None, ckpt["latent_dim"])}
    utils.check_fields(ckpt, path, {k: v for k, v in optional.items() if k in ckpt}, advice)
    return ckpt


def load_snapshot(path, module, kind: str, map_location="cpu", advice: str | None = None) -> dict:
    """Load a snapshot into an existing module, with one-line errors for a file of another kind
    or another latent size."""
    ckpt = read_snapshot(path, kind, map_location, advice)
    if ckpt["latent_dim"] != module.latent_dim:
        raise utils.CheckpointError(f"{path} has latent size {ckpt['latent_dim']}, this model "
                                    f"{module.latent_dim}; pass the matching --latent-dim")
    utils.load_state_dict_checked(module, ckpt["model"], path,
                                  advice=advice or f"pass a file written by {kind}.py")
    return ckpt


def load_amortized_vae(path, device="cpu", per_class: int | None = None):
    """The amortized VAE written by vae_amortized.py, rebuilt at its own latent size, in eval
    mode with gradients off (it is only evaluated), and the images per digit it was trained on
    (None for a file that does not say), which must be `per_class` where that is given (the
    caller's data split). Its random initialization, overwritten by the file, draws from a
    forked RNG, so a script's results do not depend on what it loads."""
    ckpt = read_snapshot(path, "vae_amortized", device)
    trained = ckpt.get("subset_per_class")
    if per_class is not None and trained is not None and trained != per_class:
        raise utils.UsageError(f"{path} was trained on {trained} images per digit; pass "
                               f"--per-class {trained}, or a VAE trained on {per_class}")
    with torch.random.fork_rng(devices=[]):     # loading must not shift the caller's RNG
        vae = VAE(ckpt["latent_dim"]).to(device)
    utils.load_state_dict_checked(vae, ckpt["model"], path,
                                  advice="pass a file written by vae_amortized.py")
    return vae.eval().requires_grad_(False), ckpt.get("subset_per_class")


def load_classifier(path, device="cpu") -> nn.Module | None:
    """Part 1's classifier from sup_classification.py's classifier.pt, in eval mode (None for
    no path: the parts that need it are skipped)."""
    if path is None:
        return None
    with torch.random.fork_rng(devices=[]):     # loading must not shift the caller's RNG
        classifier = build_classifier().to(device)
    advice = "pass the classifier.pt written by sup_classification.py, or run it again"
    utils.load_state_dict_checked(classifier, utils.load_checkpoint(path, device, advice=advice),
                                  path, advice=advice)
    return classifier.eval().requires_grad_(False)


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
    sigma^2 = 1/2 instead of 1 (vae_amortized.py shows it).
    """
    return 0.5 * (mu.pow(2) + torch.exp(logvar) - 1.0 - logvar)


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


def log_joint(x, z, decode, sigma_p: float):
    """log p(z) + log p(x|z) of the model: p(z) = N(0, I), p(x|z) = N(G(z), sigma_p^2 I)."""
    x_mean = decode(z).reshape(x.shape)
    return (log_normal_pdf(z, 0.0, 0.0)
            + log_normal_pdf(x, x_mean, 2.0 * math.log(sigma_p), event_dims=x.dim() - 1))


def aggregate_posterior_kl(mu, logvar) -> float:
    """How far the latents a decoder was trained on are from the prior it is sampled with: the
    aggregate posterior (1/N) sum_i N(mu_i, diag sigma_i^2) moment-matched to N(m, S), with
    S = Cov(mu_i) + mean_i diag(sigma_i^2), and KL(N(m, S) || N(0, I)) =
    (tr S + |m|^2 - d - log det S) / 2 in nats (0 when the moments match the prior's)."""
    mu, logvar = mu.detach().double().cpu(), logvar.detach().double().cpu()
    cov = torch.cov(mu.T) + torch.diag(logvar.exp().mean(0))
    mean = mu.mean(0)
    return 0.5 * (torch.trace(cov) + mean @ mean - len(mean) - torch.logdet(cov)).item()


def aggregate_posterior_log_prob(z, mu, logvar):
    """log q(z) for each row of z under the aggregate posterior itself, not its moments:
    q(z) = (1/N) sum_i N(z; mu_i, diag sigma_i^2), the mixture of the N training images' q_i.
    Low where no q_i puts mass, however well the mixture's mean and variance match the prior's.
    In float64: the terms below cancel."""
    z, mu, logvar = (t.detach().double() for t in (z, mu, logvar))
    inv_var = torch.exp(-logvar)
    # sum_k (z_k - mu_ik)^2 / sigma_ik^2 expanded, so that two matrix products score every z
    # against all N components (a z x N x d tensor would take gigabytes at N = 5,000, d = 200)
    squared = (z.pow(2) @ inv_var.T - 2 * z @ (mu * inv_var).T
               + (mu.pow(2) * inv_var).sum(1)).clamp_min(0)
    log_components = -0.5 * (squared + logvar.sum(1) + mu.shape[1] * LOG_2PI)
    return torch.logsumexp(log_components, dim=1) - math.log(len(mu))


def aggregate_posterior_per_dimension(mu, logvar) -> dict:
    """The aggregate posterior dimension by dimension: each latent dimension's marginal mean and
    variance (Var(mu_ij) over images + mean sigma_ij^2), the sum over dimensions of each
    marginal's KL from N(0, 1) (what remains of aggregate_posterior_kl is due to correlations
    between dimensions), and the loss's own KL term: KL(q_i || N(0, 1)) averaged over images
    and dimensions (nats per dimension, the information a latent carries about its image)."""
    mu, logvar = mu.detach().double().cpu(), logvar.detach().double().cpu()
    mean, var = mu.mean(0), mu.var(0) + logvar.exp().mean(0)
    kl_marginal = 0.5 * (var + mean.pow(2) - 1 - var.log())
    return {"marginal_variance_mean": var.mean().item(),
            "marginal_variance_min": var.min().item(), "marginal_variance_max": var.max().item(),
            "mu_variance_mean": mu.var(0).mean().item(),
            "sigma2_mean": logvar.exp().mean().item(),
            "kl_marginals_sum": kl_marginal.sum().item(),
            "kl_marginal_max": kl_marginal.max().item(),
            "kl_per_dimension": kl_std_normal(mu, logvar).mean().item()}


# ----------------------------------------------------------------------------------------------
# Losses (Eq. 5 and 6) and their evaluation
# ----------------------------------------------------------------------------------------------
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


@torch.no_grad()
def vae_evaluate(decoder, posterior, x, batch_size=500, **loss_kwargs):
    """The loss of Eq. 5/6 with a sampled z (and its mse and kl parts), and the reconstruction
    MSE with the mean of q, from one pass over x. posterior(idx, x[idx]) -> (mu, logvar) is the
    encoder (amortized, Eq. 5) or a lookup in per-image latent tables (latent optimization,
    Eq. 6). Averages over images, and the reconstruction MSE's standard error over them (so
    that training and validation images can be compared)."""
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
    recon = []
    for idx in torch.arange(len(x), device=x.device).split(batch_size):
        xb = x[idx]
        mu, logvar = posterior(idx, xb)
        loss, mse, kl = vae_loss(xb, decoder(reparameterize(mu, logvar)), mu, logvar,
                                 **loss_kwargs)
        recon.append(F.mse_loss(decoder(mu), xb, reduction="none").flatten(1).mean(1).double())
        for key, value in zip(sums, (loss, mse, kl)):
            sums[key] += value.item() * len(xb)
    recon = torch.cat(recon)
    return {**{key: value / len(x) for key, value in sums.items()},
            "recon_mse": recon.mean().item(),
            "recon_mse_se": (recon.std() / len(recon) ** 0.5).item() if len(recon) > 1 else 0.0}


@torch.no_grad()
def reconstruction_mse(decoder, mu, x, batch_size=1000):
    """Mean squared error per pixel of decoder(mu) against x: the reconstruction error with the
    mean of q, free of sampling noise."""
    total = 0.0
    for mb, xb in zip(mu.split(batch_size), x.split(batch_size)):
        total += F.mse_loss(decoder(mb), xb, reduction="sum").item()
    return total / x.numel()


# ----------------------------------------------------------------------------------------------
# Samples from the prior
# ----------------------------------------------------------------------------------------------
def prior_latents(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """n latents from p(z) = N(0, I), drawn with their own generator so that Q2 and Q3 decode the
    very same latents (and the sample-quality measurements of both use the same 1,000,
    utils.QUALITY_SAMPLES)."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Faster layers, the same parameters: torch's layers computed as the matrix products they are,
# where torch's own kernels are slow for these shapes on a CPU (tests/benchmark_cpu.py measures
# each; tests/test_model.py checks each against torch's layer, outputs and gradients).
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
    (64 to 128 channels) the kernels are as fast or faster (matmul + fold 1.5 to 4x slower), so
    they keep torch's forward (the 2x2 -> 4x4 one: MatmulGradConvTranspose2d)."""

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


class _MatmulWeightGradConvTranspose2d(torch.autograd.Function):
    """conv_transpose2d with torch's forward and input gradient (the adjoint of a transposed
    convolution is the ordinary strided convolution, F.conv2d, with the same weight), and the
    weight's gradient as one matrix product: the input's pixels, (N H W, C_in), against the
    output gradient's kh x kw patches at the input's positions (stride apart; im2col, one copy
    of the padded gradient), (N H W, kh kw C_out). Linear, so its forward-mode derivative
    (jvp) is the layer itself applied to the tangents; vmap runs it per sample."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, output_padding):
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, output_padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.conf = stride, padding, output_padding, bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (sh, sw), (ph, pw), _, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight, None, (sh, sw), (ph, pw))
        g = grad.permute(0, 2, 3, 1)               # (N, Ho, Wo, C_out), free if channels-last
        if ctx.needs_input_grad[1]:
            n, c_in, h, w = x.shape
            c_out, kh, kw = weight.shape[1:]
            full_h, full_w = (h - 1) * sh + kh, (w - 1) * sw + kw      # the uncropped output
            ho, wo = g.shape[1:3]
            g_full = F.pad(g, (0, 0, pw, full_w - pw - wo, ph, full_h - ph - ho))
            s = g_full.stride()
            cols = g_full.as_strided((n, h, w, kh, kw, c_out),
                                     (s[0], sh * s[1], sw * s[2], s[1], s[2], s[3]))
            cols = cols.reshape(n * h * w, kh * kw * c_out)
            pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c_in)
            grad_w = (pixels.t() @ cols).view(c_in, kh, kw, c_out).permute(0, 3, 1, 2)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 1, 2))
        return grad_x, grad_w, grad_b, None, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight = ctx.saved_tensors
        stride, padding, output_padding, _ = ctx.conf
        out = None
        for a, b in ((x_t, weight), (x, weight_t)):
            if a is not None and b is not None:
                term = F.conv_transpose2d(a, b, None, stride, padding, output_padding)
                out = term if out is None else out + term
        if bias_t is not None:
            out = bias_t.view(-1, 1, 1) if out is None else out + bias_t.view(-1, 1, 1)
        return out


class MatmulGradConvTranspose2d(nn.ConvTranspose2d):
    """An nn.ConvTranspose2d (the same parameters; the same forward and input gradient: torch's
    own kernels) whose weight gradient is one matrix product on the output gradient's patches
    (see _MatmulWeightGradConvTranspose2d) instead of oneDNN's backward-weights kernel. With
    the weight frozen (Q3's latent fits, Q4) it is torch's layer.

    Why: for the decoder's 2x2 -> 4x4 128 -> 128 layer, oneDNN's weight gradient runs at about
    30 % of peak. Measured forward and backward, one thread, channels-last input, the two timed
    in turns, AVX2 / AVX-512: batch 64 5.0 / 3.6 ms instead of 5.8 / 4.1; batch 128 10.2 / 6.8
    instead of 11.4 / 7.6. For the 128 -> 64 and 64 -> 32 layers it is no faster at batch 64
    (0.2 to 1 ms slower), so they stay torch's; so does a backward that calls torch's input and
    weight gradients separately (F.conv2d, then convolution_backward), 0.1 to 0.5 ms slower
    than torch's one call for all three layers."""

    def forward(self, x, output_size=None):
        if output_size is not None or self.groups != 1 or self.dilation != (1, 1) \
                or self.padding_mode != "zeros" or not self.weight.requires_grad \
                or not torch.is_grad_enabled():
            return super().forward(x, output_size)
        return _MatmulWeightGradConvTranspose2d.apply(x, self.weight, self.bias, self.stride,
                                                      self.padding, self.output_padding)


@functools.lru_cache(maxsize=16)   # one matrix per layer shape, dtype and device, built once
def _window_means(h: int, w: int, kh: int, kw: int, dtype, device) -> torch.Tensor:
    """(h w, kh kw): column (i, j) averages the inputs that kernel tap (i, j) meets over all
    output positions of a stride-1, unpadded kh x kw convolution of an h x w input."""
    ho, wo = h - kh + 1, w - kw + 1
    a = torch.zeros(h, w, kh, kw, dtype=dtype, device=device)
    for i in range(kh):
        for j in range(kw):
            a[i:i + ho, j:j + wo, i, j] = 1.0 / (ho * wo)
    return a.view(h * w, kh * kw)


class PooledConv2d(nn.Conv2d):
    """An nn.Conv2d followed by a global average pool (nn.AdaptiveAvgPool2d(1)): the same
    parameters, output (N, C_out, 1, 1), the same result up to float rounding. Both are linear,
    so the mean of the convolution over its output positions is the weight applied once to the
    mean of each kernel tap's inputs: a (h w) -> (kh kw) average per channel (a small matmul),
    then one matmul with the weight, (N, C kh kw) @ (C kh kw, C_out). Ho Wo times fewer FLOPs
    than the convolution (9x for the encoder's 4x4 -> 3x3 layer).

    Why: the encoder's last convolution, forward and backward at batch 64, one thread, timed
    in turns, AVX2 / AVX-512: 0.75 / 0.86 ms instead of 6.0 / 4.5 (conv and pool)."""

    def forward(self, x):
        if self.stride != (1, 1) or self.padding not in ((0, 0), "valid") \
                or self.dilation != (1, 1) or self.groups != 1 or x.dim() != 4:
            return F.adaptive_avg_pool2d(super().forward(x), 1)  # a case this layer does not cover
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        means = _window_means(h, w, kh, kw, x.dtype, x.device)   # (h w, kh kw)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            taps = means.t() @ x.permute(0, 2, 3, 1).reshape(n, h * w, c)   # (N, kh kw, C)
            weight = self.weight.permute(2, 3, 1, 0).reshape(kh * kw * c, self.out_channels)
        else:
            taps = x.reshape(n * c, h * w) @ means                          # (N C, kh kw)
            weight = self.weight.reshape(self.out_channels, c * kh * kw).t()
        taps = taps.reshape(n, -1)
        out = taps @ weight if self.bias is None else torch.addmm(self.bias, taps, weight)
        return out.view(n, self.out_channels, 1, 1)


# model.py's rewrites of torch layers: each computes what its torch base class computes (for
# PooledConv2d: followed by a global average pool) from the same parameters.
REWRITTEN_LAYERS = (PatchConv2d, PooledConv2d, MatmulConvTranspose2d, MatmulGradConvTranspose2d)
