"""The VAE's densities against torch.distributions, and the networks' shapes."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import model


def random_gaussians(n=64, d=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    logvar = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2
    return mu, logvar


EXTREME = [
    (0.0, -40.0),    # sigma ~ 2e-9
    (0.0, 40.0),     # sigma ~ 5e8
    (1e3, 0.0),      # large mean
    (-1e3, -20.0),
    (0.5, 20.0),
]


def test_kl_matches_torch_distributions_per_dimension():
    mu, logvar = random_gaussians()
    ours = model.kl_std_normal(mu, logvar)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mu,logvar", EXTREME)
def test_kl_extreme_inputs_finite_and_exact(mu, logvar):
    mu_t, lv_t = torch.tensor([mu], dtype=torch.float64), torch.tensor([logvar], dtype=torch.float64)
    ours = model.kl_std_normal(mu_t, lv_t)
    ref = kl_divergence(Normal(mu_t, torch.exp(0.5 * lv_t)), Normal(0.0, 1.0))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_eq7_as_printed_is_two_kl_plus_log_sigma_and_has_the_wrong_minimum():
    mu, logvar = random_gaussians()
    kl = model.kl_std_normal(mu, logvar)
    torch.testing.assert_close(model.kl_eq7_as_printed(mu, logvar), 2 * kl + 0.5 * logvar)
    # Minimize both over log sigma^2 at mu = 0 on a fine grid: KL at sigma^2 = 1, Eq. 7 at 1/2.
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    zero = torch.zeros_like(grid)
    assert math.exp(grid[model.kl_std_normal(zero, grid).argmin()]) == pytest.approx(1.0, abs=1e-3)
    assert math.exp(grid[model.kl_eq7_as_printed(zero, grid).argmin()]) == pytest.approx(0.5, abs=1e-3)
    # ... and Eq. 7 is not even a divergence: it is negative for some q, and nonzero at q = p.
    assert model.kl_eq7_as_printed(zero[:1], torch.tensor([math.log(0.5)])).item() < 0


def test_log_normal_pdf_matches_torch_distributions():
    mu, logvar = random_gaussians()
    x = torch.randn_like(mu) * 4
    ref = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1).log_prob(x)
    torch.testing.assert_close(model.log_normal_pdf(x, mu, logvar), ref, rtol=1e-10, atol=1e-8)
    # scalar log-variance broadcast, several event dimensions (images)
    img, mean = torch.randn(5, 1, 28, 28, dtype=torch.float64), torch.randn(5, 1, 28, 28,
                                                                               dtype=torch.float64)
    ref = Independent(Normal(mean, 0.4), 3).log_prob(img)
    torch.testing.assert_close(model.log_normal_pdf(img, mean, 2 * math.log(0.4), event_dims=3),
                               ref, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("mu,logvar", EXTREME)
def test_log_normal_pdf_extreme_inputs_finite(mu, logvar):
    x = torch.tensor([[0.3, -2.0, 5.0]], dtype=torch.float64)
    m = torch.full_like(x, mu)
    lv = torch.full_like(x, logvar)
    ours = model.log_normal_pdf(x, m, lv)
    ref = Independent(Normal(m, torch.exp(0.5 * lv)), 1).log_prob(x)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-6)
    # in float32 too (the dtype the networks use)
    assert torch.isfinite(model.log_normal_pdf(x.float(), m.float(), lv.float())).all()


def test_reparameterization_mean_and_variance():
    n = 200_000
    torch.manual_seed(0)
    mu = torch.tensor([1.5, -2.0, 0.0], dtype=torch.float64)
    logvar = torch.tensor([0.0, math.log(0.25), math.log(9.0)], dtype=torch.float64)
    z = model.reparameterize(mu.expand(n, 3), logvar.expand(n, 3))
    var = torch.exp(logvar)
    # 5 standard errors: mean s.e. = sigma / sqrt(n); variance s.e. = sigma^2 sqrt(2 / (n - 1))
    assert ((z.mean(0) - mu).abs() < 5 * var.sqrt() / math.sqrt(n)).all()
    assert ((z.var(0) - var).abs() < 5 * var * math.sqrt(2 / (n - 1))).all()


def test_reparameterization_is_differentiable_and_uses_given_eps():
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    eps = torch.ones(2, 3)
    z = model.reparameterize(mu, logvar, eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(2, 3))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.ones(2, 3))


def test_vae_loss_is_pixel_mean_mse_plus_dimension_mean_kl():
    torch.manual_seed(1)
    x, x_hat = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    mu, logvar = torch.randn(4, 200), torch.randn(4, 200)
    loss, mse, kl = model.vae_loss(x, x_hat, mu, logvar)
    torch.testing.assert_close(mse, torch.nn.MSELoss()(x_hat, x))
    ref_kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(loss, mse + kl)


@pytest.mark.parametrize("latent_dim", [200, 2])
def test_network_shapes(latent_dim):
    vae = model.VAE(latent_dim)
    x = torch.randn(3, 1, 28, 28)
    mu, logvar = vae.encoder(x)
    assert mu.shape == logvar.shape == (3, latent_dim)
    assert vae.decoder(mu).shape == (3, 1, 28, 28)
    x_hat, mu2, _ = vae(x)
    assert x_hat.shape == x.shape and mu2.shape == (3, latent_dim)
    assert isinstance(vae.decoder.fc, torch.nn.Linear) and vae.decoder.fc.in_features == latent_dim


def test_init_latents_follow_q3_and_have_no_infinite_log():
    mu, logvar = model.init_latents(5000, 200, seed=0)
    assert torch.isfinite(logvar).all()
    sigma2 = logvar.exp()
    # sigma ~ N(0, 1)  =>  sigma^2 ~ chi^2_1 with mean 1; mu ~ N(0, 1)
    assert abs(sigma2.mean().item() - 1) < 5 * math.sqrt(2 / sigma2.numel())
    assert abs(mu.mean().item()) < 5 / math.sqrt(mu.numel())


def test_elbo_objective_is_the_negative_elbo_of_the_sigma_p_model():
    """--loss elbo: per image, -E log N(x; G(z), sigma_p^2 I) + KL, up to the constant
    D/2 log(2 pi sigma_p^2), averaged over the batch (torch.distributions as the oracle)."""
    torch.manual_seed(2)
    x, x_hat = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randn(4, 1, 28, 28,
                                                                           dtype=torch.float64)
    mu, logvar = torch.randn(4, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)
    loss, mse, kl = model.vae_loss(x, x_hat, mu, logvar, objective="elbo", sigma_p=0.4)
    log_lik = Independent(Normal(x_hat, 0.4), 3).log_prob(x)
    kl_ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    const = 784 / 2 * math.log(2 * math.pi * 0.4**2)
    torch.testing.assert_close(loss, (-log_lik + kl_ref).mean() - const)
    torch.testing.assert_close(mse, torch.nn.MSELoss()(x_hat, x))      # monitoring parts unchanged
    with pytest.raises(ValueError):
        model.vae_loss(x, x_hat, mu, logvar, objective="mse")


def test_aggregate_posterior_kl_is_the_kl_of_the_moment_matched_gaussian():
    from torch.distributions import MultivariateNormal

    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(500, 4, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    logvar = torch.randn(500, 4, generator=gen, dtype=torch.float64) * 0.2 - 1
    cov = torch.cov(mu.T) + torch.diag(logvar.exp().mean(0))
    ref = kl_divergence(MultivariateNormal(mu.mean(0), cov),
                        MultivariateNormal(torch.zeros(4, dtype=torch.float64),
                                           torch.eye(4, dtype=torch.float64)))
    assert model.aggregate_posterior_kl(mu, logvar) == pytest.approx(ref.item(), rel=1e-10)


def test_loading_a_network_does_not_consume_the_callers_randomness(tmp_path):
    path = tmp_path / "vae.pt"
    model.save_snapshot(path, model.VAE(8), 1, 8, "vae_amortized")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    vae = model.load_amortized_vae(path)
    assert torch.equal(torch.rand(3), expected)
    assert vae.latent_dim == 8 and not vae.training
    with pytest.raises(Exception, match="not a vae_latent_opt checkpoint"):
        model.read_snapshot(path, "vae_latent_opt")
