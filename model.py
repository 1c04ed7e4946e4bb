"""The course's convolutional VAE and the model's densities (HUJI Exercise 1, Sec. 3.1).

Pixels are in [-1, 1] and the decoder has no output activation, as in the course's model.py.
Every density is computed in log space; equation numbers refer to the exercise text.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """S: image (N, 1, 28, 28) -> (mu, r = log sigma^2), each (N, d)."""

    def __init__(self, latent_dim: int = 200):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),    # 28 -> 14
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
            nn.ConvTranspose2d(128, 128, 2), nn.ReLU(),                                   # 1 -> 2
            nn.ConvTranspose2d(128, 128, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # 4
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1), nn.ReLU(),                # 4 -> 7
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),   # 14
            nn.ConvTranspose2d(32, 1, 3, stride=2, padding=1, output_padding=1),           # 28
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


def vae_loss(x, x_hat, mu, logvar):
    """Eq. 5/6 aggregated as the exercise asks (Sec. 3.2 'KL aggregation'): the MSE averaged over
    pixels (torch.nn.MSELoss) plus the KL averaged over latent dimensions, both averaged over
    the batch. Returns (loss, mse, kl)."""
    mse = F.mse_loss(x_hat, x)
    kl = kl_std_normal(mu, logvar).mean()
    return mse + kl, mse, kl


# ----------------------------------------------------------------------------------------------
# Importance-sampled log-likelihood (Sec. 3.1.6)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def importance_log_likelihood(x, mu, logvar, decode, sigma_p: float, num_samples: int = 1000,
                              chunk_size: int = 4096, generator: torch.Generator | None = None):
    """Eq. 9: log p(x) ~= logsumexp_i [log p(z_i) + log p(x|z_i) - log q(z_i|x)] - log M,
    z_i ~ q(.|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), p(x|z) = N(decode(z), sigma_p^2 I).

    Batched over images and samples; at most `chunk_size` decoder evaluations are in memory at
    once, whatever M and the number of images. Returns a dict of per-image tensors:
      log_px  the estimate of Eq. 9,
      stderr  its Monte-Carlo standard error (delta method: sd(w) / (sqrt(M) mean(w))),
      elbo    mean of the same log-weights, an unbiased estimate of the ELBO (Eq. 4),
      ess     effective sample size (sum w)^2 / sum w^2, from 1 (one weight dominates, and the
              standard error above is then meaningless) to M (all weights equal),
      log_w   the log-weights themselves, (M, images), in sampling order.
    """
    n_images, latent_dim = mu.shape
    event_dims = x.dim() - 1
    log_sigma_p_sq = 2.0 * math.log(sigma_p)
    image_block = max(1, min(n_images, chunk_size))
    log_w_blocks = []
    for start in range(0, n_images, image_block):
        xb, mub, lvb = (t[start:start + image_block] for t in (x, mu, logvar))
        sample_block = max(1, chunk_size // len(xb))
        log_w = []
        for s in range(0, num_samples, sample_block):
            m = min(sample_block, num_samples - s)
            eps = torch.randn((m, *mub.shape), generator=generator, device=mub.device,
                              dtype=mub.dtype)
            z = reparameterize(mub, lvb, eps)                                   # (m, B, d)
            x_mean = decode(z.reshape(m * len(xb), latent_dim)).reshape(m, *xb.shape)
            log_w.append(log_normal_pdf(z, 0.0, 0.0)                            # log p(z)
                         + log_normal_pdf(xb, x_mean, log_sigma_p_sq, event_dims)  # log p(x|z)
                         - log_normal_pdf(z, mub, lvb))                         # log q(z|x)
        log_w_blocks.append(torch.cat(log_w))                                   # (M, B)
    log_w = torch.cat(log_w_blocks, dim=1)
    log_px = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    # Delta method on log(mean w): weights rescaled by their max so nothing overflows.
    w = torch.exp(log_w - log_w.max(dim=0).values)
    if num_samples > 1:
        stderr = w.std(dim=0) / (math.sqrt(num_samples) * w.mean(dim=0))
    else:
        stderr = torch.full_like(log_px, float("nan"))
    ess = w.sum(dim=0).pow(2) / w.pow(2).sum(dim=0)
    return {"log_px": log_px, "stderr": stderr, "elbo": log_w.mean(dim=0), "ess": ess,
            "log_w": log_w}


# ----------------------------------------------------------------------------------------------
# Training helpers shared by the amortized (Q1) and latent-optimization (Q3) VAEs
# ----------------------------------------------------------------------------------------------
def vae_epoch(decoder, posterior, x, batch_size, optimizers, progress=None):
    """One training pass over the images x in shuffled batches, with the loss of Eq. 5/6
    (`vae_loss`) and a fresh eps per image per step.

    posterior(idx, x[idx]) -> (mu, logvar) is the encoder (amortized, Eq. 5) or a lookup in the
    per-image latent tables (latent optimization, Eq. 6). Returns the averages of loss, mse and
    kl over the epoch (a running average: the weights change while it is computed).
    """
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
    for idx in torch.randperm(len(x), device=x.device).split(batch_size):
        mu, logvar = posterior(idx, x[idx])
        loss, mse, kl = vae_loss(x[idx], decoder(reparameterize(mu, logvar)), mu, logvar)
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
def vae_evaluate(decoder, posterior, x, batch_size=500):
    """The loss of Eq. 5/6 with a sampled z (and its mse and kl parts), and the reconstruction
    MSE with the mean of q, from one pass over x (posterior as in `vae_epoch`). Averages over
    images."""
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0, "recon_mse": 0.0}
    for idx in torch.arange(len(x), device=x.device).split(batch_size):
        xb = x[idx]
        mu, logvar = posterior(idx, xb)
        loss, mse, kl = vae_loss(xb, decoder(reparameterize(mu, logvar)), mu, logvar)
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


def prior_latents(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """n latents from p(z) = N(0, I), drawn with their own generator so that Q2 and Q3 decode the
    very same latents."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


def fit_latents(decoder, x, steps: int, lr: float, init_seed: int, progress=None):
    """Test-time latent optimization: with the decoder frozen, fit each image's own mu and
    r = log sigma^2 by Adam on the loss of Eq. 6 (initialized as in Q3: mu ~ N(0, I),
    sigma ~ N(0, I)). Returns (mu, logvar)."""
    mu, logvar = init_latents(len(x), decoder.latent_dim, init_seed, device=x.device)
    mu, logvar = mu.requires_grad_(), logvar.requires_grad_()
    opt = torch.optim.Adam([mu, logvar], lr=lr)
    for p in decoder.parameters():
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
        for p in decoder.parameters():
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
