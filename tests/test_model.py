"""model.py: the densities and losses against torch.distributions, the networks' shapes, and
saving and loading them (every field of a snapshot checked like a flag)."""
import math
import re

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import model
import utils


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
    vae, per_class = model.load_amortized_vae(path)
    assert torch.equal(torch.rand(3), expected)
    assert vae.latent_dim == 8 and not vae.training and per_class is None
    with pytest.raises(Exception, match="not a vae_latent_opt checkpoint"):
        model.read_snapshot(path, "vae_latent_opt")


@pytest.mark.parametrize("field,value,expected", [
    ("epoch", "25", "field 'epoch' is '25', not an integer from 1 to 10000"),
    ("latent_dim", 10**12, "field 'latent_dim' is '1000000000000', not an integer from 1 to 1024"),
    ("latent_dim", True, "field 'latent_dim' is 'True', not an integer"),
    ("latent_dim", 8.0, "not an integer"),
    ("subset_per_class", -3, "field 'subset_per_class'"),
    ("subset_per_class", "500", "field 'subset_per_class'"),
    ("model", [1, 2], "field 'model'"),
    ("kind", "vae_latent_opt", "not a vae_amortized checkpoint"),
    ("mu", torch.zeros(5, 3), "field 'mu'"),
    ("model", {"bad": torch.zeros(1)}, "does not fit this model"),
])
def test_every_snapshot_field_is_checked_like_a_flag(tmp_path, field, value, expected):
    """A crafted snapshot is one CheckpointError naming the field: no 32 GB allocation for a
    latent size of 10^12, no network built from True."""
    path = tmp_path / "vae.pt"
    model.save_snapshot(path, model.VAE(8), 1, 8, "vae_amortized", subset_per_class=500)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, field: value}, path)
    with pytest.raises(utils.CheckpointError, match=re.escape(expected)):
        model.load_amortized_vae(path)


def test_a_snapshot_with_non_finite_weights_is_refused(tmp_path):
    vae = model.VAE(4)
    with torch.no_grad():
        vae.decoder.fc.weight[0, 0] = float("inf")
    model.save_snapshot(tmp_path / "vae.pt", vae, 1, 4, "vae_amortized")
    with pytest.raises(utils.CheckpointError, match="not finite"):
        model.load_amortized_vae(tmp_path / "vae.pt")


def test_the_classifier_round_trips_and_a_vae_is_not_a_classifier(tmp_path):
    net = model.build_classifier()
    utils.save_checkpoint(net.state_dict(), tmp_path / "classifier.pt")
    loaded = model.load_classifier(tmp_path / "classifier.pt")
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net.eval()(x))
    utils.save_checkpoint(model.VAE(8).state_dict(), tmp_path / "vae.pt")
    with pytest.raises(utils.CheckpointError, match="sup_classification.py"):
        model.load_classifier(tmp_path / "vae.pt")


def test_classify_samples_counts_shares_entropy_and_coverage():
    class Fixed(torch.nn.Module):       # predicts digit 3 for the first half, 7 for the rest
        def forward(self, x):
            logits = torch.full((len(x), 10), -10.0)
            logits[: len(x) // 2, 3] = 10.0
            logits[len(x) // 2:, 7] = 10.0
            return logits

    q = model.classify_samples(Fixed(), torch.zeros(10, 1, 28, 28))
    assert q["share"][3] == q["share"][7] == 0.5 and q["digits_covered"] == 2
    assert q["entropy_bits"] == pytest.approx(1.0)
    assert q["mean_confidence"] == pytest.approx(1.0, abs=1e-6)
