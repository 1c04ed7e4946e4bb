"""Eq. 9 (importance-sampled log p(x)) proved on a linear-Gaussian model, where log p(x) is known
exactly: p(z) = N(0, I), p(x|z) = N(Wz + b, sigma_p^2 I)  =>  p(x) = N(b, W W^T + sigma_p^2 I)."""
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import model

SIGMA_P = 0.4
D, d = 6, 3


@pytest.fixture(scope="module")
def linear_gaussian():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, d, generator=gen, dtype=torch.float64))
    scales = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    w = q * scales                       # orthogonal columns: the exact posterior is diagonal
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    x = b + torch.randn(8, D, generator=gen, dtype=torch.float64) * 1.5
    exact = MultivariateNormal(b, w @ w.T + SIGMA_P**2 * torch.eye(D, dtype=torch.float64)).log_prob(x)
    # exact posterior N(Mm^-1 W^T (x - b), sigma^2 Mm^-1), Mm = W^T W + sigma^2 I (diagonal here)
    mm = scales**2 + SIGMA_P**2
    post_mu = ((x - b) @ w) / mm
    post_logvar = torch.log(SIGMA_P**2 / mm).expand_as(post_mu)
    return {"w": w, "b": b, "x": x, "exact": exact, "post_mu": post_mu, "post_logvar": post_logvar,
            "decode": lambda z: z @ w.T + b}


@pytest.mark.parametrize("num_samples", [1, 7, 1000])
def test_exact_posterior_gives_exact_log_px_for_every_m(linear_gaussian, num_samples):
    lg = linear_gaussian
    res = model.importance_log_likelihood(lg["x"], lg["post_mu"], lg["post_logvar"], lg["decode"],
                                          SIGMA_P, num_samples,
                                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(res["log_px"], lg["exact"], rtol=0, atol=1e-9)
    torch.testing.assert_close(res["elbo"], lg["exact"], rtol=0, atol=1e-9)  # tight bound
    if num_samples > 1:
        assert (res["stderr"] < 1e-6).all()                                    # zero variance
    torch.testing.assert_close(res["ess"], torch.full_like(res["ess"], float(num_samples)))


def test_other_q_agrees_within_standard_errors_and_converges(linear_gaussian):
    lg = linear_gaussian
    mu = lg["post_mu"] + 0.3                      # a wrong but overlapping proposal
    logvar = lg["post_logvar"] + 0.7
    errors = {}
    for m in (10, 10_000):
        res = model.importance_log_likelihood(lg["x"], mu, logvar, lg["decode"], SIGMA_P, m,
                                              chunk_size=512,
                                              generator=torch.Generator().manual_seed(2))
        err = res["log_px"] - lg["exact"]
        errors[m] = err.abs().mean().item()
        assert ((res["ess"] >= 1) & (res["ess"] < m)).all()
        if m == 10_000:
            assert (err.abs() < 5 * res["stderr"] + 1e-3).all(), (err, res["stderr"])
            assert (res["stderr"] < 0.05).all()
            # with many samples the ELBO of a wrong q lies clearly below the truth
            assert (res["elbo"] < lg["exact"] - 0.1).all()
        # Jensen on the very same samples: mean of log w <= log of mean w
        assert (res["elbo"] <= res["log_px"] + 1e-12).all()
    assert errors[10_000] < errors[10] / 5


def test_chunking_bounds_the_decoder_batch(linear_gaussian):
    lg = linear_gaussian
    seen = []

    def decode(z):
        seen.append(len(z))
        return lg["decode"](z)

    res = model.importance_log_likelihood(lg["x"], lg["post_mu"], lg["post_logvar"], decode,
                                          SIGMA_P, 1000, chunk_size=100)
    assert max(seen) <= 100 and sum(seen) == 1000 * len(lg["x"])
    torch.testing.assert_close(res["log_px"], lg["exact"], rtol=0, atol=1e-9)
    # fewer images than a chunk but more images than chunk_size also works
    res = model.importance_log_likelihood(lg["x"], lg["post_mu"], lg["post_logvar"], decode,
                                          SIGMA_P, 5, chunk_size=3)
    torch.testing.assert_close(res["log_px"], lg["exact"], rtol=0, atol=1e-9)


def test_estimate_is_finite_for_extreme_images_on_the_real_network():
    torch.manual_seed(0)
    vae = model.VAE(200).eval()
    x = torch.stack([torch.full((1, 28, 28), -1.0), torch.full((1, 28, 28), 1.0),
                     torch.randn(1, 28, 28) * 50])
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
    res = model.importance_log_likelihood(x, mu, logvar, vae.decoder, SIGMA_P, 50)
    assert all(torch.isfinite(res[k]).all() for k in ("log_px", "stderr", "elbo"))
    assert (res["elbo"] <= res["log_px"] + 1e-4).all()
    # an image far from anything the decoder makes is (much) less likely
    assert res["log_px"][2] < res["log_px"][0] - 1000


def test_single_sample_standard_error_is_nan_not_zero(linear_gaussian):
    lg = linear_gaussian
    res = model.importance_log_likelihood(lg["x"], lg["post_mu"] + 1, lg["post_logvar"],
                                          lg["decode"], SIGMA_P, 1)
    assert torch.isnan(res["stderr"]).all()
    assert math.isfinite(res["log_px"].sum().item())
