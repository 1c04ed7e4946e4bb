"""model.py: the densities and losses against torch.distributions, the networks' shapes, and
saving and loading them (every field of a snapshot checked like a flag)."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
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


@pytest.mark.parametrize("scale", [1.0, 0.02])   # wide components, and narrow ones in 200 dims
def test_aggregate_posterior_log_prob_is_the_mixture_of_the_q_i(scale):
    from torch.distributions import Categorical, MixtureSameFamily

    gen = torch.Generator().manual_seed(4)
    n, d = 300, 200
    mu = torch.randn(n, d, generator=gen)
    logvar = torch.randn(n, d, generator=gen) * 0.3 + 2 * math.log(scale)
    z = torch.cat([torch.randn(20, d, generator=gen),                        # prior draws
                   mu[:20] + scale * torch.randn(20, d, generator=gen)])     # near a component
    mixture = MixtureSameFamily(Categorical(logits=torch.zeros(n, dtype=torch.float64)),
                                Independent(Normal(mu.double(), (0.5 * logvar.double()).exp()), 1))
    got = model.aggregate_posterior_log_prob(z, mu, logvar)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, mixture.log_prob(z.double()), rtol=1e-9, atol=1e-6)

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
    utils.save_checkpoint({"model": vae.state_dict(), "epoch": 1, "latent_dim": 4,   # crafted:
                           "kind": "vae_amortized"}, tmp_path / "vae.pt")          # save_snapshot refuses
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


# ---- the rewritten layers against nn.Conv2d / nn.ConvTranspose2d ----------------------------
# model.py's rewritten layers against torch's own nn.Conv2d / nn.ConvTranspose2d (the oracle):
# outputs and gradients (input, weight, bias) to float tolerance, and whole networks against a
# plain nn.Sequential built from the same weights.
class ConvThenPool(nn.Conv2d):
    """The reference for model.PooledConv2d: torch's convolution, then a global average pool
    (the same parameters and state_dict keys as nn.Conv2d)."""

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(super().forward(x), 1)


LAYERS = [
    (model.PatchConv2d, nn.Conv2d, dict(in_channels=1, out_channels=32, kernel_size=3, stride=2,
                                        padding=1), (1, 28, 28)),          # the encoder's first
    (model.PatchConv2d, nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=(3, 2),
                                        stride=(1, 2), padding=(1, 0), bias=False), (3, 9, 8)),
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=128, out_channels=128, kernel_size=2), (128, 1, 1)),  # the decoder's first
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=32, out_channels=1, kernel_size=3, stride=2, padding=1, output_padding=1),
     (32, 14, 14)),                                                         # the decoder's last
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1), (6, 4, 4)),
    (model.MatmulConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=5, out_channels=3, kernel_size=2, bias=False), (5, 1, 1)),
    (model.MatmulGradConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=128, out_channels=128, kernel_size=3, stride=2, padding=1,
          output_padding=1), (128, 2, 2)),                                 # the decoder's second
    (model.MatmulGradConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1), (6, 4, 4)),
    (model.MatmulGradConvTranspose2d, nn.ConvTranspose2d,
     dict(in_channels=5, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
          output_padding=(1, 0), bias=False), (5, 3, 4)),
    (model.PooledConv2d, ConvThenPool,
     dict(in_channels=128, out_channels=128, kernel_size=2), (128, 4, 4)),  # the encoder's last
    (model.PooledConv2d, ConvThenPool,
     dict(in_channels=3, out_channels=5, kernel_size=(3, 2), bias=False), (3, 5, 6)),
    (model.PooledConv2d, ConvThenPool,                                    # not covered: torch's
     dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (3, 7, 7)),
]


def outputs_and_grads(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("fast_cls,ref_cls,kwargs,shape", LAYERS)
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_matches_torch(fast_cls, ref_cls, kwargs, shape, batch, channels_last):
    gen = torch.Generator().manual_seed(batch)
    torch.manual_seed(batch)
    fast = fast_cls(**kwargs)
    ref = ref_cls(**kwargs)
    ref.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(batch, *shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fast, ref = (m.to(memory_format=torch.channels_last) for m in (fast, ref))
    out_ref = ref(x)
    grad_out = torch.randn(out_ref.shape, generator=gen)
    out_ref, grads_ref = outputs_and_grads(ref, x, grad_out)
    out_fast, grads_fast = outputs_and_grads(fast, x, grad_out)
    assert out_fast.shape == out_ref.shape
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    assert len(grads_fast) == len(grads_ref)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch.func's first use
def test_matmul_grad_conv_transpose_has_torchs_forward_and_exact_derivatives():
    """Its forward is torch's own kernel (bit for bit); its backward and its forward-mode
    derivative (used by Q4's jacfwd) pass gradcheck in float64, stride and padding uneven."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=4, out_channels=3, kernel_size=(3, 2), stride=(2, 3),
                  padding=(1, 0), output_padding=(1, 2))
    fast = model.MatmulGradConvTranspose2d(**kwargs)
    ref = nn.ConvTranspose2d(**kwargs)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 4, 3, 4)
    assert torch.equal(fast(x), ref(x))
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    fast = fast.double()

    def apply(x, weight, bias):
        return model._MatmulWeightGradConvTranspose2d.apply(
            x, weight, bias, fast.stride, fast.padding, fast.output_padding)

    inputs = (x.double().requires_grad_(), fast.weight.detach().clone().requires_grad_(),
              fast.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(apply, inputs, check_forward_ad=True)


def plain_copy(net: nn.Module) -> nn.Module:
    """The same network with every rewritten layer replaced by the torch layer it rewrites,
    loaded with the same weights."""
    if isinstance(net, model.REWRITTEN_LAYERS):
        base = nn.Conv2d if isinstance(net, nn.Conv2d) else nn.ConvTranspose2d
        ref = base(net.in_channels, net.out_channels, net.kernel_size, net.stride, net.padding,
                   **({"output_padding": net.output_padding} if base is nn.ConvTranspose2d else {}),
                   bias=net.bias is not None)
        ref.load_state_dict(net.state_dict())
        return ref
    if isinstance(net, nn.Sequential):
        return nn.Sequential(*[plain_copy(m) for m in net])
    return net


def test_the_networks_use_the_rewritten_layers_and_keep_their_state_dict_keys():
    vae = model.VAE(200)
    assert isinstance(vae.encoder.conv[0], model.PatchConv2d)
    assert isinstance(vae.encoder.conv[6], model.PooledConv2d)
    assert isinstance(vae.encoder.conv[7], nn.AdaptiveAvgPool2d)   # what plain_copy relies on
    assert isinstance(vae.decoder.deconv[0], model.MatmulConvTranspose2d)
    assert isinstance(vae.decoder.deconv[2], model.MatmulGradConvTranspose2d)
    assert isinstance(vae.decoder.deconv[-1], model.MatmulConvTranspose2d)
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.conv.0.weight"] == (32, 1, 3, 3)
    assert shapes["decoder.deconv.0.weight"] == (128, 128, 2, 2)
    assert shapes["decoder.deconv.8.weight"] == (32, 1, 3, 3)
    assert len(shapes) == 24


@pytest.mark.parametrize("latent_dim", [200, 2])
@pytest.mark.parametrize("batch", [1, 5])
def test_encoder_and_decoder_match_a_plain_sequential_reference(latent_dim, batch):
    torch.manual_seed(latent_dim + batch)
    enc, dec = model.Encoder(latent_dim), model.Decoder(latent_dim)
    # The reference: plain nn layers in one nn.Sequential each, from the same weights.
    enc_conv, dec_deconv = plain_copy(enc.conv), plain_copy(dec.deconv)
    ref_encoder = nn.Sequential(enc_conv)
    ref_decoder = nn.Sequential(dec.fc, nn.Unflatten(1, (128, 1, 1)), dec_deconv)
    assert not any(isinstance(m, model.REWRITTEN_LAYERS)
                   for m in list(ref_encoder.modules()) + list(ref_decoder.modules()))
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 28, 28, generator=gen).requires_grad_(True)
    z = torch.randn(batch, latent_dim, generator=gen).requires_grad_(True)

    def run(encode, decode, params):
        mu, logvar = encode(x)
        image = decode(z)
        loss = (mu.pow(2).sum() + logvar.sin().sum() + image.pow(2).sum())
        grads = torch.autograd.grad(loss, [x, z, *params])
        return [mu, logvar, image, *grads]

    fast_params = list(enc.parameters()) + list(dec.parameters())
    ref_params = (list(enc_conv.parameters()) + list(enc.mu.parameters())
                  + list(enc.logvar.parameters()) + list(dec.fc.parameters())
                  + list(dec_deconv.parameters()))
    h = lambda t: ref_encoder(t).flatten(1)                              # noqa: E731
    ours = run(enc, dec, fast_params)
    theirs = run(lambda t: (enc.mu(h(t)), enc.logvar(h(t))), ref_decoder, ref_params)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_vae_evaluate_reconstruction_error_and_its_standard_error_over_images():
    """A 'decoder' that reshapes a 784-d latent into the image, and a posterior whose mean is
    half the image: each image's reconstruction MSE is mean((x/2 - x)^2) = mean(x^2)/4. Its
    mean and standard error over the images against numpy's, across batch boundaries."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(30, 1, 28, 28, generator=gen) * 2 - 1
    result = model.vae_evaluate(lambda z: z.view(-1, 1, 28, 28),
                                lambda idx, xb: (xb.flatten(1) / 2, torch.zeros(len(xb), 784)),
                                x, batch_size=7)
    per_image = (x.double() ** 2).flatten(1).mean(1).numpy() / 4
    assert result["recon_mse"] == pytest.approx(per_image.mean())
    assert result["recon_mse_se"] == pytest.approx(per_image.std(ddof=1) / np.sqrt(30))


def test_a_snapshot_with_weights_that_are_not_finite_is_refused_and_the_old_file_kept(tmp_path):
    path = tmp_path / "vae_epoch1.pt"
    path.write_bytes(b"the earlier run's snapshot")
    vae = model.VAE(4)
    with torch.no_grad():
        vae.decoder.fc.weight[0, 0] = float("nan")
    with pytest.raises(utils.UsageError, match="not finite"):
        model.save_snapshot(path, vae, 1, 4, "vae_amortized")
    assert path.read_bytes() == b"the earlier run's snapshot"

