"""Eq. 9 (importance-sampled log p(x)), its diagnostics and the Laplace proposal, proved on a
linear-Gaussian model where log p(x) is known exactly: p(z) = N(0, I), p(x|z) = N(Wz + b,
sigma_p^2 I)  =>  p(x) = N(b, W W^T + sigma_p^2 I) (torch.distributions.MultivariateNormal)."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import log_likelihood
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
    post_sd = torch.sqrt(SIGMA_P**2 / mm).expand_as(post_mu)
    return {"w": w, "b": b, "x": x, "exact": exact, "post_mu": post_mu, "post_sd": post_sd,
            "decode": lambda z: z @ w.T + b}


@pytest.mark.parametrize("num_samples", [1, 7, 1000])
def test_exact_posterior_gives_exact_log_px_for_every_m(linear_gaussian, num_samples):
    lg = linear_gaussian
    res = log_likelihood.importance_log_likelihood(lg["x"], lg["post_mu"], lg["post_sd"], lg["decode"],
                                          SIGMA_P, num_samples,
                                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(res["log_px"], lg["exact"], rtol=0, atol=1e-9)
    torch.testing.assert_close(res["elbo"], lg["exact"], rtol=0, atol=1e-9)  # tight bound
    torch.testing.assert_close(res["ess"], torch.full_like(res["ess"], float(num_samples)))
    if num_samples >= 25:                 # equal weights have a bounded tail
        assert (res["khat"] < 0.5).all()


def test_full_covariance_draw_matches_multivariate_normal():
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    scale = torch.triu(torch.randn(4, 5, 5, generator=gen, dtype=torch.float64))
    scale.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(4, 5, generator=gen, dtype=torch.float64) + 0.2)
    eps = torch.randn(7, 4, 5, generator=gen, dtype=torch.float64)
    z, log_q = log_likelihood.gaussian_draw(mean, scale, eps)
    ref = MultivariateNormal(mean, covariance_matrix=scale @ scale.transpose(1, 2)).log_prob(z)
    torch.testing.assert_close(log_q, ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(z[2, 1], mean[1] + scale[1] @ eps[2, 1])


@pytest.mark.parametrize("num_samples", [1, 10, 1000])
def test_laplace_proposal_is_the_exact_posterior_of_a_linear_decoder(num_samples):
    """Non-orthogonal W: the posterior has a full covariance that no diagonal q can match; the
    Laplace proposal, started far from the mode, reproduces it, so every weight equals p(x)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(D, d, generator=gen, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    x = b + 2 * torch.randn(5, D, generator=gen, dtype=torch.float64)
    exact = MultivariateNormal(b, w @ w.T + SIGMA_P**2 * torch.eye(D, dtype=torch.float64)).log_prob(x)
    decode = lambda z: z @ w.T + b                                          # noqa: E731
    centre, scale = log_likelihood.laplace_proposal(x, decode, SIGMA_P, torch.full((5, d), 3.0,
                                                                          dtype=torch.float64),
                                           adam_steps=20, newton_steps=1)
    res = log_likelihood.importance_log_likelihood(x, centre, scale, decode, SIGMA_P, num_samples,
                                          generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(res["log_px"], exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(res["ess"], torch.full_like(res["ess"], float(num_samples)))
    # ... while the best diagonal q (the posterior's own marginal variances) is not exact
    cov = torch.linalg.inv(scale @ scale.transpose(1, 2))
    diag = log_likelihood.importance_log_likelihood(x, centre, torch.linalg.inv(cov).diagonal(dim1=1, dim2=2)
                                           .rsqrt(), decode, SIGMA_P, 1000,
                                           generator=torch.Generator().manual_seed(6))
    assert (diag["ess"] < 999).all()


def test_other_q_converges_and_elbo_is_below(linear_gaussian):
    lg = linear_gaussian
    mu, sd = lg["post_mu"] + 0.3, lg["post_sd"] * math.exp(0.35)   # wrong but overlapping
    errors = {}
    for m in (10, 10_000):
        res = log_likelihood.importance_log_likelihood(lg["x"], mu, sd, lg["decode"], SIGMA_P, m,
                                              chunk_size=512,
                                              generator=torch.Generator().manual_seed(2))
        errors[m] = (res["log_px"] - lg["exact"]).abs().mean().item()
        assert ((res["ess"] >= 1) & (res["ess"] < m)).all()
        assert (res["elbo"] <= res["log_px"] + 1e-12).all()       # Jensen on the same samples
    assert errors[10_000] < errors[10] / 5
    assert (res["elbo"] < lg["exact"] - 0.1).all()


def test_effective_sample_size_is_the_textbook_formula():
    log_w = torch.randn(500, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    w = log_w.exp()
    torch.testing.assert_close(log_likelihood.effective_sample_size(log_w), w.sum(0) ** 2 / (w**2).sum(0))


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_khat_recovers_the_tail_of_a_too_narrow_proposal(s):
    """Target N(0, 1), proposal N(0, s^2): w(z) = exp(z^2 (1/s^2 - 1) / 2) / s has a Pareto tail
    with shape k = 1 - s^2 (P(w > t) ~ t^(-1 / (1 - s^2)))."""
    gen = torch.Generator().manual_seed(1)
    z = s * torch.randn(4000, 40, generator=gen, dtype=torch.float64)
    log_w = 0.5 * z.pow(2) * (1 / s**2 - 1) - math.log(s)
    khat = log_likelihood.pareto_khat(log_w)
    assert abs(khat.mean().item() - (1 - s**2)) < 0.1, khat.mean()


def test_khat_is_small_for_bounded_weights_and_large_for_a_light_tailed_proposal():
    gen = torch.Generator().manual_seed(2)
    uniform = torch.rand(1000, 20, generator=gen, dtype=torch.float64).log()      # k = -1
    assert (log_likelihood.pareto_khat(uniform) < 0).all()
    z = 2 * torch.randn(1000, 20, generator=gen, dtype=torch.float64)             # wider q
    assert (log_likelihood.pareto_khat(-0.5 * z**2 + 0.125 * z**2) < 0).all()
    z = 0.3 * torch.randn(1000, 20, generator=gen, dtype=torch.float64)           # k = 0.91
    assert log_likelihood.pareto_khat(0.5 * z**2 * (1 / 0.09 - 1)).mean() > 0.7        # k-hat is biased low
    assert torch.isnan(log_likelihood.pareto_khat(torch.zeros(10, 2))).all()             # too few samples


def test_bootstrap_error_bar_covers_the_truth_at_the_stated_rate(linear_gaussian):
    """200 independent M = 1,000 estimates of one image's log p(x) with a wrong proposal: the
    bootstrap sd matches their actual spread, and estimate +- 1.96 sd covers the exact value in
    about 95 % of them."""
    lg = linear_gaussian
    x, mu, sd = lg["x"][:1].expand(200, D), lg["post_mu"][:1] + 0.3, lg["post_sd"][:1] * 1.4
    res = log_likelihood.importance_log_likelihood(x, mu.expand(200, d), sd.expand(200, d), lg["decode"],
                                          SIGMA_P, 1000, generator=torch.Generator().manual_seed(4))
    boot = log_likelihood.bootstrap_sd(res["log_w"], resamples=300, seed=0)
    spread = res["log_px"].std()
    assert 0.8 < boot.median() / spread < 1.25, (boot.median(), spread)
    covered = ((res["log_px"] - lg["exact"][0]).abs() < 1.96 * boot).double().mean()
    assert 0.88 <= covered <= 0.99, covered


def test_chunking_bounds_the_decoder_batch(linear_gaussian):
    lg = linear_gaussian
    seen = []

    def decode(z):
        seen.append(len(z))
        return lg["decode"](z)

    res = log_likelihood.importance_log_likelihood(lg["x"], lg["post_mu"], lg["post_sd"], decode,
                                          SIGMA_P, 1000, chunk_size=100)
    assert max(seen) <= 100 and sum(seen) == 1000 * len(lg["x"])
    torch.testing.assert_close(res["log_px"], lg["exact"], rtol=0, atol=1e-9)
    res = log_likelihood.importance_log_likelihood(lg["x"], lg["post_mu"], lg["post_sd"], decode,
                                          SIGMA_P, 5, chunk_size=3)
    torch.testing.assert_close(res["log_px"], lg["exact"], rtol=0, atol=1e-9)


def test_estimates_are_finite_for_extreme_images_on_the_real_network():
    torch.manual_seed(0)
    vae = model.VAE(200).eval().requires_grad_(False)
    x = torch.stack([torch.full((1, 28, 28), -1.0), torch.full((1, 28, 28), 1.0),
                     torch.randn(1, 28, 28) * 50])
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
    res = log_likelihood.importance_log_likelihood(x, mu, torch.exp(0.5 * logvar), vae.decoder, SIGMA_P, 50)
    assert all(torch.isfinite(res[k]).all() for k in ("log_px", "elbo", "ess"))
    assert (res["elbo"] <= res["log_px"] + 1e-4).all()
    assert res["log_px"][2] < res["log_px"][0] - 1000     # far from anything the decoder makes
    centre, scale = log_likelihood.laplace_proposal(x, vae.decoder, SIGMA_P, mu, adam_steps=5,
                                           newton_steps=1)
    lap = log_likelihood.importance_log_likelihood(x, centre, scale, vae.decoder, SIGMA_P, 50)
    assert torch.isfinite(lap["log_px"]).all()
    # the fitted proposal finds at least as much of p(x) as the encoder's (up to MC noise)
    assert (lap["log_px"] > res["log_px"] - 5).all()


def test_kl_full_to_diagonal_matches_torch_distributions():
    from torch.distributions import kl_divergence

    gen = torch.Generator().manual_seed(7)
    mean1, mean0 = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    scale1 = torch.tril(torch.randn(3, 4, 4, generator=gen, dtype=torch.float64))
    scale1.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.3)
    logvar0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    total, mean_part = log_likelihood.kl_full_to_diagonal(mean1, scale1, mean0, logvar0)
    ref = kl_divergence(MultivariateNormal(mean1, scale_tril=scale1),
                        MultivariateNormal(mean0, covariance_matrix=torch.diag_embed(logvar0.exp())))
    torch.testing.assert_close(total, ref)
    same_means, zero = log_likelihood.kl_full_to_diagonal(mean0, scale1, mean0, logvar0)
    torch.testing.assert_close(total - same_means, mean_part)     # the means' share
    assert (zero == 0).all()


# ---- Q4's answers from the estimates -----------------------------------------------------------
def crafted(means, se_scale=1.0, train_shift=0.0):
    """5 training and 5 test images per digit around the given per-digit means (offsets -2 to 2
    times se_scale); the training images shifted by train_shift."""
    log_px, digits, split = [], [], []
    for d, m in enumerate(means):
        for s in ("train", "test"):
            for k in (-2, -1, 0, 1, 2):
                log_px.append(m + k * se_scale + (train_shift if s == "train" else 0.0))
                digits.append(d)
                split.append(s)
    return log_px, digits, split


def test_summarize_names_the_most_and_least_likely_digits_and_their_ties():
    means = [-200.0 - 10 * d for d in range(10)]          # digit 0 most, 9 least likely
    result = log_likelihood.summarize(*crafted(means))
    assert result["most_likely_digit"] == 0 and result["least_likely_digit"] == 9
    se = result["per_digit"]["0"]["se"]
    assert se == pytest.approx(math.sqrt(sum(k * k for k in (-2, -1, 0, 1, 2)) * 2 / 9 / 10))
    # a digit just inside two combined standard errors of the best is tied, just outside not
    line = 2 * math.hypot(se, se)
    for gap, tied in ((0.99 * line, True), (1.01 * line, False)):
        means[1] = means[0] - gap
        result = log_likelihood.summarize(*crafted(means))
        assert (1 in result["most_likely_tied_with"]) == tied


@pytest.mark.parametrize("z,expected", [(1.99, "neither"), (2.01, "train"), (-2.01, "test")])
def test_train_vs_test_needs_two_standard_errors(z, expected):
    means = [-200.0 - 10 * d for d in range(10)]
    plain = log_likelihood.summarize(*crafted(means))
    diff_se = math.hypot(plain["train_se"], plain["test_se"])
    # shifting every training image moves the difference, not its standard error
    r = log_likelihood.summarize(*crafted(means, train_shift=z * diff_se))
    assert r["train_minus_test"] / r["train_minus_test_se"] == pytest.approx(z, rel=1e-6)
    assert r["train_vs_test"] == expected


def test_quick_run_writes_both_estimates_diagnostics_and_figures(quick_outputs):
    from conftest import metrics

    out = quick_outputs / "log_likelihood"
    m = metrics(out)
    assert len(m["images"]) == 100
    assert sum(i["split"] == "train" for i in m["images"]) == 50
    assert all(i["eq9_elbo"] <= i["eq9_log_px"] + 1e-3 for i in m["images"])
    assert all(i["gap"] == pytest.approx(i["log_px"] - i["eq9_log_px"]) for i in m["images"])
    assert all(i["sd"] >= 0 and 1 <= i["ess"] <= m["num_samples"] + 1e-6 for i in m["images"])
    assert set(m["per_digit"]) == {str(d) for d in range(10)}
    assert m["per_digit"][str(m["most_likely_digit"])]["mean"] == max(
        v["mean"] for v in m["per_digit"].values())
    assert m["train_vs_test"] in ("neither", "train", "test")
    assert len(m["convergence"]["digits"]) == 10 and m["num_samples"] in m["convergence"]["M"]
    for name in ("eq9", "laplace"):
        assert all(len(row) == len(m["convergence"]["M"]) for row in m["convergence"][name])
    for name in ("q4_log_px_examples.png", "q4_log_px_per_digit.png", "q4_convergence.png"):
        assert (out / name).is_file()
    assert (quick_outputs / "log_likelihood_elbo" / "metrics.json").is_file()    # the ablation


def test_decoder_jacobian_matches_central_differences():
    """Q4's forward-mode Jacobian (vmap of jacfwd, through the rewritten layers) against central
    differences of the same decoder in float64 (exact up to O(h^2) for a piecewise-linear net)."""
    torch.manual_seed(0)
    dec, h = model.Decoder(8).double(), 1e-6
    z = torch.randn(3, 8, dtype=torch.float64)
    ours = log_likelihood.decoder_jacobian(dec, z)
    with torch.no_grad():
        columns = [(dec(z + h * e) - dec(z - h * e)).flatten(1) / (2 * h)
                   for e in torch.eye(8, dtype=torch.float64)]
    torch.testing.assert_close(ours, torch.stack(columns, dim=2), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("m,expected", [(1, None), (10, None), (11, 1 - 1 / math.log10(11)),
                                        (1000, 1 - 1 / 3), (2000, 1 - 1 / math.log10(2000)),
                                        (2200, 0.7), (100_000, 0.7)])
def test_khat_threshold_is_the_current_psis_rule(m, expected):
    got = log_likelihood.khat_threshold(m)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_diagnostics_share_above_the_threshold_and_none_without_a_fit():
    result = {"ess": torch.tensor([1.0, 3.0, 500.0, 2.0]), "sd": torch.tensor([0.1, 0.2, 0.3, 4.0]),
              "khat": torch.tensor([0.66, 0.68, float("nan"), 1.2], dtype=torch.float64)}
    d = log_likelihood.diagnostics(result, 1000)               # threshold 0.667
    assert d["share_khat_above_threshold"] == pytest.approx(2 / 3)
    assert d["share_ess_below_2"] == 0.25 and d["median_ess"] == 2.5 and d["max_sd"] == 4.0
    d = log_likelihood.diagnostics(result, 5)                  # no rule below 11 samples
    assert d["khat_threshold"] is None and d["share_khat_above_threshold"] is None


@pytest.mark.parametrize("share,ess,expected", [
    (0.5, 1.0, "no"), (0.49, 1.0, "partly"), (0.01, 500.0, "partly"), (0.0, 1.0, "yes"),
    (None, 9.9, "no"), (None, 10.0, "yes")])
def test_trust_follows_the_share_of_images_above_the_khat_limit(share, ess, expected):
    assert log_likelihood.trust({"share_khat_above_threshold": share,
                                 "median_ess": ess}) == expected


def ranking(most, least, most_ties=(), least_ties=(), train_vs_test="neither"):
    return {"most_likely_digit": most, "least_likely_digit": least,
            "most_likely_tied_with": list(most_ties), "least_likely_tied_with": list(least_ties),
            "train_vs_test": train_vs_test}


def test_agreement_of_eq9_with_the_converged_estimate_and_changes_within_ties():
    same = log_likelihood.agreement(ranking(1, 2), ranking(1, 2))
    assert same == {"most": True, "least": True, "train_vs_test": True,
                    "changes_within_ties": True}
    tied = log_likelihood.agreement(ranking(1, 8, least_ties=[2]), ranking(1, 2, least_ties=[8]))
    assert not tied["least"] and tied["changes_within_ties"]
    one_sided = log_likelihood.agreement(ranking(1, 8, least_ties=[2]), ranking(1, 2))
    assert not one_sided["changes_within_ties"]              # 2 is not tied with 8 by Eq. 9
    other = log_likelihood.agreement(ranking(1, 2), ranking(1, 2, train_vs_test="train"))
    assert not other["train_vs_test"] and other["most"]


def test_movement_is_from_the_exercises_m_to_the_largest():
    convergence = {"M": [1, 10, 100], "eq9": [[0.0, 1.0, 3.0], [5.0, 4.0, 2.0]]}
    assert log_likelihood.movement(convergence, "eq9", 10) == {"min": -2.0, "max": 2.0,
                                                              "max_abs": 2.0}
    assert log_likelihood.movement(convergence, "eq9", 1000) is None     # M not reached


def test_stream_disagreement_compares_each_stream_with_its_own_images_estimate():
    """Two streams, for the images at positions 2 and 0 of the main estimates."""
    convergence = {"M": [1, 10], "images": [2, 0],
                   "eq9": [[0.0, -5.0], [0.0, -1.0]], "laplace": [[0.0, -3.5], [0.0, -2.0]]}
    estimates = {"eq9": {"log_px": torch.tensor([-3.0, 99.0, -7.0])},      # image 1: no stream
                 "laplace": {"log_px": torch.tensor([-2.25, 99.0, -3.0])}}
    assert log_likelihood.stream_disagreement(convergence, estimates, 10) == {
        "eq9": 2.0, "laplace": 0.5}                                    # |-1 - -3|, |-3.5 - -3|
    assert log_likelihood.stream_disagreement(convergence, estimates, 1000) is None



def test_the_digit_with_most_ink_is_ranked_by_log_px():
    """Q4 (b): the most-ink digit and its rank by mean log p(x), 1 = most likely."""
    ink = {str(d): 100.0 + d for d in range(10)}                  # 9 has the most ink
    log_px = {str(d): -300.0 + 10 * d for d in range(10)}         # and is the most likely
    assert log_likelihood.most_ink(ink, log_px) == {"digit": 9, "lit_pixels": 109.0, "rank": 1}
    log_px["9"] = -299.5                                          # now only 0 is less likely
    assert log_likelihood.most_ink(ink, log_px)["rank"] == 9
