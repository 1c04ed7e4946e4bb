"""vae_latent_opt.py (HUJI Q3): the initialization, the test-time latent fit, Q3's verdicts at
their boundaries, the file arguments, and the script end to end in --quick mode."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import math

import numpy as np
import pytest
import scipy.stats
import torch

import model
import vae_latent_opt
from conftest import chain_args, comparable, metrics, run_injected, run_inprocess, run_script


def test_init_latents_follow_q3_and_have_no_infinite_log():
    mu, logvar = vae_latent_opt.init_latents(5000, 200, seed=0)
    assert torch.isfinite(logvar).all()
    sigma2 = logvar.exp()
    # sigma ~ N(0, 1)  =>  sigma^2 ~ chi^2_1 with mean 1; mu ~ N(0, 1)
    assert abs(sigma2.mean().item() - 1) < 5 * math.sqrt(2 / sigma2.numel())
    assert abs(mu.mean().item()) < 5 / math.sqrt(mu.numel())


class Count:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_fit_latents_lowers_the_loss_and_leaves_the_decoder_as_it_was():
    torch.manual_seed(0)
    decoder = model.Decoder(4)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    x = torch.tanh(torch.randn(6, 1, 28, 28))
    start_mu, start_logvar = vae_latent_opt.init_latents(6, 4, seed=3)
    bar = Count()
    mu, logvar = vae_latent_opt.fit_latents(decoder, x, steps=50, lr=0.05, init_seed=3,
                                            progress=bar)
    assert bar.n == 50 and not mu.requires_grad
    with torch.no_grad():
        def loss(m, lv):
            return model.vae_loss(x, decoder(m), m, lv)[0].item()
        assert loss(mu, logvar) < loss(start_mu, start_logvar)
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())
    assert all(p.requires_grad for p in decoder.parameters())


def same(a_proposed, lo_proposed, a_fitted, lo_fitted):
    return {"amortized": {"proposed_train": a_proposed, "fitted_train": a_fitted},
            "latent_opt": {"proposed_train": lo_proposed, "fitted_train": lo_fitted}}


def quality(lo_conf, lo_cover, a_conf=0.9, a_cover=8):
    return {"latent_opt": {"mean_confidence": lo_conf, "digits_covered": lo_cover},
            "amortized": {"mean_confidence": a_conf, "digits_covered": a_cover}}


@pytest.mark.parametrize("a,lo,expected", [(0.10, 0.11, "amortized"), (0.11, 0.10, "latent_opt"),
                                            (0.10, 0.10, "latent_opt")])   # a tie: no win
def test_better_q_follows_the_lower_error_of_the_proposals_alone(a, lo, expected):
    v = vae_latent_opt.q3_verdicts(same(a, lo, 0.2, 0.1), None)      # fitted: latent opt. wins
    assert v["better_q"] == expected and v["better_decoder"] == "latent_opt"
    assert v["prior"] is None


@pytest.mark.parametrize("a,lo,expected", [(0.10, 0.11, "amortized"), (0.11, 0.10, "latent_opt"),
                                            (0.10, 0.10, "latent_opt")])
def test_better_decoder_follows_the_lower_error_of_the_same_budget_fits_alone(a, lo, expected):
    v = vae_latent_opt.q3_verdicts(same(0.1, 0.2, a, lo), None)      # proposals: amortized wins
    assert v["better_decoder"] == expected and v["better_q"] == "amortized"


@pytest.mark.parametrize("a_loss,lo_loss,expected", [(0.50, 0.51, "amortized"),
                                                      (0.51, 0.50, "latent_opt"),
                                                      (0.50, 0.50, "latent_opt")])    # a tie: no win
def test_better_q_by_loss_follows_the_lower_loss_of_the_whole_q(a_loss, lo_loss, expected):
    errors = same(0.1, 0.2, 0.1, 0.2)                       # by the means alone: amortized
    errors["amortized"]["proposed_train_loss"] = a_loss
    errors["latent_opt"]["proposed_train_loss"] = lo_loss
    v = vae_latent_opt.q3_verdicts(errors, None)
    assert v["better_q_by_loss"] == expected and v["better_q"] == "amortized"
    assert "better_q_by_loss" not in vae_latent_opt.q3_verdicts(same(0.1, 0.2, 0.1, 0.2), None)


def test_q_loss_is_the_expected_mse_under_q_plus_the_mean_kl():
    """A linear decoder G(z) = A z + b has a closed form: E||A z + b - x||^2 / D =
    (||A mu + b - x||^2 + sum_j (A^2)_ij sigma_j^2) / D; the KL is torch.distributions'."""
    torch.manual_seed(0)
    d, pixels = 3, 784
    linear = torch.nn.Linear(d, pixels).double()
    decoder = lambda z: linear(z).view(-1, 1, 28, 28)           # noqa: E731
    mu, logvar = torch.randn(4, d).double(), torch.randn(4, d).double()
    x = torch.randn(4, 1, 28, 28).double()
    with torch.no_grad():
        mean_err = (linear(mu) - x.flatten(1)).pow(2).sum(1)
        spread = (linear.weight.pow(2) @ logvar.exp().T).T.sum(1)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean(1)
    expected = (mean_err + spread) / pixels + kl
    got = vae_latent_opt.q_loss(decoder, mu, logvar, x, draws=4_000)   # within 0.4 %
    assert torch.allclose(got, expected, rtol=0.01)
    assert torch.equal(got, vae_latent_opt.q_loss(decoder, mu, logvar, x, draws=4_000))


@pytest.mark.parametrize("lo_gain,nearer", [(0.0101, True), (0.0099, False)])
def test_the_encoder_is_nearer_its_best_when_a_refit_gains_it_less(lo_gain, nearer):
    """The amortized proposals gain 0.01 from the refit (0.13 -> 0.12); the learned mu_i gain
    lo_gain: just above it, the encoder's proposals were the nearer to their decoder's best."""
    v = vae_latent_opt.q3_verdicts(same(0.13, 0.16, 0.12, 0.16 - lo_gain), None)
    assert v["encoder_nearer_best"] is nearer


@pytest.mark.parametrize("lo_conf,lo_cover,expected", [
    (0.851, 7, "sufficient"), (0.849, 7, "insufficient"), (0.9, 6, "insufficient")])
def test_prior_verdict_flips_at_its_lines(lo_conf, lo_cover, expected):
    assert vae_latent_opt.q3_verdicts({}, quality(lo_conf, lo_cover))["prior"] == expected


@pytest.mark.parametrize("kl,near", [(9.99, True), (10.0, False), (10.01, False)])
def test_the_aggregate_posterior_is_near_the_prior_below_005_nats_per_dimension(kl, near):
    assert vae_latent_opt.q3_verdicts({}, None, kl, 200)["aggregate_near_prior"] is near
    assert vae_latent_opt.q3_verdicts({}, None)["aggregate_near_prior"] is None


@pytest.mark.parametrize("mu_variance, overlap", [(0.759, True), (0.761, False)])
def test_q3_codes_overlap_when_means_vary_less_than_each_q(mu_variance, overlap):
    aggregate = {"mu_variance_mean": mu_variance, "sigma2_mean": 0.76}
    assert vae_latent_opt.q3_verdicts({}, None, aggregate=aggregate)["codes_overlap"] is overlap
    assert vae_latent_opt.q3_verdicts({}, None)["codes_overlap"] is None


@pytest.mark.parametrize("lo_grey, greyer", [(0.201, True), (0.2, False), (0.199, False)])
def test_q3_samples_are_greyer_only_above_the_amortized_share(lo_grey, greyer):
    grey = {"latent_opt": lo_grey, "amortized": 0.2, "real": 0.1}
    assert vae_latent_opt.q3_verdicts({}, None, grey=grey)["samples_greyer"] is greyer
    assert vae_latent_opt.q3_verdicts({}, None, grey={"latent_opt": 0.3})["samples_greyer"] is None


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    gen = torch.Generator().manual_seed(7)
    a, b = torch.rand(50, generator=gen).double(), torch.rand(50, generator=gen).double()
    result = vae_latent_opt.paired_difference(a, b)
    diff = (a - b).numpy()
    assert result["mean"] == pytest.approx(diff.mean())
    assert result["se"] == pytest.approx(diff.std(ddof=1) / len(diff) ** 0.5)


def test_grey_share_counts_pixels_strictly_between_background_and_stroke():
    images = torch.tensor([-1.0, -0.8, -0.79, 0.0, 0.79, 0.8, 1.0, 1.0])   # 3 of 8 mid-grey
    assert vae_latent_opt.grey_share(images) == pytest.approx(3 / 8)


def test_quick_run_writes_the_comparisons_and_figures(quick_outputs):
    out = quick_outputs / "vae_latent_opt"
    m = metrics(out)
    assert len(m["train_loss"]) == 2 and set(m["val_fit_recon_mse"]) == {"1", "2"}
    assert m["amortized_val10_recon_mse"] > 0          # the Q1 comparison row was drawn
    for method in ("amortized", "latent_opt"):           # the same-budget comparison
        assert m["same_budget"][method]["fitted_train"] > 0
    assert set(m["sample_quality"]) == {"amortized", "latent_opt"}
    assert m["verdicts"]["better_q"] in ("amortized", "latent_opt")
    assert m["verdicts"]["prior_gap"] in ("same", "larger", "smaller")     # both decoders tested
    assert m["verdicts"]["variety_gap"] in ("same", "larger", "smaller")
    assert set(m["prior_vs_aggregate"]["classified"]) == {"prior", "aggregate"}
    assert 0 < m["real_variety"]["mean"] and "variety_ratio" in m["wide_start"]["prior_vs_aggregate"]
    assert m["amortized_prior_vs_aggregate"]["images"] == m["prior_vs_aggregate"]["images"]
    assert m["verdicts"]["outside_gap"] in ("more", "same", "fewer")
    for key in ("prior_outside", "amortized_prior_outside"):
        assert 0 <= m[key]["outside"]["mean"] <= 1 and m[key]["draws"] == m["prior_vs_aggregate"]["images"]
    # Q3 (a) without the decoders: each method's own proposals against its refit, image by
    # image; a mean of differences is the difference of the means
    same = m["same_budget"]
    for r in (same["amortized"], same["latent_opt"]):
        assert r["shortfall"]["mean"] == pytest.approx(r["proposed_train"] - r["fitted_train"])
        assert r["shortfall"]["se"] > 0
    assert same["paired"]["shortfall"]["mean"] == pytest.approx(
        same["latent_opt"]["shortfall"]["mean"] - same["amortized"]["shortfall"]["mean"])
    assert same["paired"]["val_fit_vs_encoder"]["mean"] == pytest.approx(
        same["latent_opt"]["fitted_val"] - same["amortized"]["proposed_val"])
    # the real images' mid-grey share, per image with its standard error, is the pooled share
    assert m["real_grey_per_image"]["mean"] == pytest.approx(m["grey_share"]["real"])
    assert m["real_grey_per_image"]["se"] > 0
    for name in ("loss_curves.png", "q3_reconstructions_train.png", "q3_reconstructions_val.png",
                 "q3_prior_samples.png", "decoder_final.pt"):
        assert (out / name).is_file(), name


def test_a_folder_for_amortized_means_the_vae_final_inside_it(tmp_path, quick_outputs, capsys,
                                                              monkeypatch):
    """--amortized <folder> uses the folder's vae_final.pt (it used to skip Q3's comparison rows
    with a note); a folder without one is an error, not a note."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    args = ["--quick", "--epochs", "1", "--device", "cpu", "--fit-steps", "2",
            "--classifier", quick_outputs / "sup_classification"]
    code, err = run_inprocess("vae_latent_opt.py", [*args, "--amortized",
                                                    quick_outputs / "vae_amortized",
                                                    "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert metrics(tmp_path / "o")["amortized_val10_recon_mse"] > 0
    code, err = run_inprocess("vae_latent_opt.py", [*args, "--amortized", tmp_path,
                                                    "--out", tmp_path / "p"], capsys)
    assert code == 2 and "holds no vae_final.pt" in err
    assert err.count("\n") == 1 and not (tmp_path / "p").exists()


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, quick_outputs):
    """Killed after epoch 1 of 2: run again, equal to the quick chain's uninterrupted run."""
    whole, killed = quick_outputs / "vae_latent_opt", tmp_path / "killed"
    args = chain_args(quick_outputs, "vae_latent_opt")
    proc = run_injected("kill-after-epoch", 1, "vae_latent_opt.py", *args, "--out", killed)
    assert proc.returncode == 137 and not (killed / "metrics.json").exists()
    run_script("vae_latent_opt.py", *args, "--out", killed)
    assert comparable(killed) == comparable(whole)


def versus(prior, aggregate, se=0.01):
    return {"prior": {"share": prior, "se": se}, "aggregate": {"share": aggregate, "se": se},
            "other_bands": {"0.5": {"prior": {"share": prior, "se": se},
                                    "aggregate": {"share": aggregate, "se": se}}}}


@pytest.mark.parametrize("lo_gap,expected", [(0.0999, "same"), (0.1401, "larger"),
                                             (0.0599, "smaller"), (0.1399, "same")])
def test_the_prior_gap_is_the_same_as_q1s_within_two_standard_errors(lo_gap, expected):
    """Q1's prior draws are 0.1 greyer than its training latents; four SEs of 0.01 make two
    standard errors of the difference of the two gaps 2 * sqrt(4) * 0.01 = 0.04."""
    v = vae_latent_opt.q3_verdicts({}, None, versus=versus(0.3 + lo_gap, 0.3),
                                   versus_amortized=versus(0.3, 0.2))
    assert v["prior_gap"] == expected and v["prior_gap_same_every_band"]
    assert "prior_gap" not in vae_latent_opt.q3_verdicts({}, None, versus=versus(0.4, 0.3))


@pytest.mark.parametrize("lo_aggregate,greyer", [(0.2283, True), (0.2282, False)])
def test_the_decoder_is_greyer_when_its_own_latents_decode_two_ses_greyer(lo_aggregate, greyer):
    """Fed their own training latents: 2 sqrt(2) 0.01 = 0.02828 above Q1's 0.2."""
    v = vae_latent_opt.q3_verdicts({}, None, versus=versus(0.4, lo_aggregate),
                                   versus_amortized=versus(0.3, 0.2))
    assert v["decoder_greyer"] is greyer


def test_the_prior_gap_verdict_names_a_band_where_it_differs():
    lo, am = versus(0.4, 0.3), versus(0.3, 0.2)                # the same gap at the main band
    lo["other_bands"]["0.5"]["prior"]["share"] = 0.6          # ...but not at 0.5
    assert not vae_latent_opt.q3_verdicts({}, None, versus=lo,
                                          versus_amortized=am)["prior_gap_same_every_band"]


@pytest.mark.parametrize("gap,not_greyer", [(0.0282, True), (0.0284, False), (-0.5, True)])
def test_prior_draws_are_no_greyer_unless_two_standard_errors_above(gap, not_greyer):
    """SEs 0.01 each: two standard errors of the difference are 0.02828."""
    b = {"share": 0.30, "se": 0.01}
    assert vae_latent_opt.not_greyer({"share": 0.30 + gap, "se": 0.01}, b) is not_greyer


def test_prior_against_aggregate_draws_from_the_training_latents():
    """A 'decoder' that copies its latent into the pixels: draws from latents at 0.5 with a
    tiny sigma are all mid-grey, prior images of -1 none; the shares and their standard errors
    are numpy's."""
    decoder = lambda z: z.unsqueeze(1)                        # noqa: E731 (a stand-in network)
    mu, logvar = torch.full((30, 4), 0.5), torch.full((30, 4), -20.0)
    prior = -torch.ones(40, 1, 4)
    prior[:10] = 0.0                                            # a quarter of them grey
    result = vae_latent_opt.prior_against_aggregate(decoder, mu, logvar, prior, seed=0)
    assert result["aggregate"] == {"share": 1.0, "se": 0.0}
    grey = np.array([1.0] * 10 + [0.0] * 30)
    assert result["prior"]["share"] == pytest.approx(grey.mean())
    assert result["prior"]["se"] == pytest.approx(grey.std(ddof=1) / np.sqrt(40))
    assert result["prior_not_greyer"]                           # less grey than the aggregate
    # latents at 0.7: mid-grey for the bands 0.8 and 0.95, not for 0.5, where the prior's
    # quarter of grey images makes it the greyer one
    mu = torch.full((30, 4), 0.7)
    result = vae_latent_opt.prior_against_aggregate(decoder, mu, logvar, prior, seed=0)
    assert result["prior_not_greyer"] and result["other_bands_not_greyer"] == {"0.5": False, "0.95": True}
    assert not result["same_verdict_every_band"]
    mu = torch.full((30, 4), 0.3)                               # grey in every band: the same verdict
    result = vae_latent_opt.prior_against_aggregate(decoder, mu, logvar, prior, seed=0)
    assert result["other_bands_not_greyer"] == {"0.5": True, "0.95": True} and result["same_verdict_every_band"]


def test_variety_ratio_has_the_delta_method_standard_error():
    ratio = vae_latent_opt.variety_ratio({"prior": {"mean": 0.04, "se": 0.001},
                                          "aggregate": {"mean": 0.08, "se": 0.002}})
    assert ratio["ratio"] == pytest.approx(0.5)
    assert ratio["se"] == pytest.approx(0.5 * math.sqrt(0.025 ** 2 + 0.025 ** 2))


def with_ratio(ratio, se=0.01):
    return {"variety_ratio": {"ratio": ratio, "se": se}}


@pytest.mark.parametrize("lo_ratio, expected", [(0.7, "same"), (0.7282, "same"), (0.7284, "smaller"),
                                                (0.6718, "same"), (0.6716, "larger"), (0.48, "larger")])
def test_the_variety_gap_is_q1s_within_two_standard_errors_of_the_ratios(lo_ratio, expected):
    """Both ratios with SE 0.01: two standard errors of their difference are 0.02828, so around
    Q1's 0.7 the line lies at 0.7 -/+ 0.0283 (a lower ratio is a larger shortfall)."""
    assert vae_latent_opt.variety_gap(with_ratio(lo_ratio), with_ratio(0.7)) == expected


def test_prior_against_aggregate_measures_variety_and_asks_the_classifier():
    """Prior images all alike have no variety; draws from latents spread over two values have
    some; a stand-in classifier that reads the first pixel's sign labels both sets."""
    decoder = lambda z: z.unsqueeze(1)                        # noqa: E731 (a stand-in network)
    mu = torch.cat([torch.full((15, 4), -0.5), torch.full((15, 4), 0.5)])
    logvar = torch.full((30, 4), -20.0)
    prior = torch.zeros(40, 1, 4)
    classifier = lambda x: torch.nn.functional.one_hot(      # noqa: E731
        (x.flatten(1)[:, 0] > 0).long() * 8, 10).float() * 10
    result = vae_latent_opt.prior_against_aggregate(decoder, mu, logvar, prior, seed=0,
                                                    classifier=classifier)
    assert result["variety"]["prior"] == {"mean": 0.0, "se": 0.0}
    assert result["variety"]["aggregate"]["mean"] > 0.2     # +-0.5 about a mean near 0
    assert result["variety_ratio"]["ratio"] == 0.0
    assert result["classified"]["prior"]["share"][0] == 1.0  # zeros: not above 0
    shares = result["classified"]["aggregate"]["share"]
    assert shares[0] + shares[8] == pytest.approx(1.0) and 0 < shares[8] < 1
    assert vae_latent_opt.prior_against_aggregate(decoder, mu, logvar, prior, 0)["classified"] is None


def test_prior_draws_fall_outside_latents_that_leave_gaps_and_not_inside_a_matching_mixture():
    """Oracles. Latents whose every q_i is N(0, I): their mixture is the prior, so
    KL(p || q) = 0 exactly, and a prior draw falls below the 1 % quantile of the mixture's own
    draws about 1 % of the time. Narrow q_i (sigma 0.05) scattered like the prior: their
    mixture matches the prior's mean and variance, but a prior draw in 50 dimensions lies far
    from every one of them, so all prior draws fall outside."""
    gen = torch.Generator().manual_seed(5)
    n, d = 2000, 50
    prior_z = torch.randn(n, d, generator=gen)
    matching = vae_latent_opt.prior_outside_latents(torch.zeros(400, d), torch.zeros(400, d),
                                                    prior_z, seed=1)
    assert matching["kl_prior_to_latents"]["mean"] == pytest.approx(0, abs=1e-9)
    share = matching["outside"]["mean"]
    assert abs(share - 0.01) < 3 * math.sqrt(0.01 * 0.99 / n) and matching["expected"] == 0.01
    assert matching["outside"]["se"] == pytest.approx(math.sqrt(share * (1 - share) / (n - 1)))
    narrow = vae_latent_opt.prior_outside_latents(torch.randn(400, d, generator=gen),
                                                  torch.full((400, d), 2 * math.log(0.05)),
                                                  prior_z, seed=1)
    assert narrow["outside"]["mean"] == 1.0 and narrow["draws"] == n
    assert narrow["kl_prior_to_latents"]["mean"] > 100


def test_narrow_dimensions_count_each_images_variances_below_half_the_priors():
    """Crafted variances: image 0 has 3 of 5 dimensions below 1/2 (one just below, 0.499), image
    1 none (one exactly 1/2, which is not below), image 2 all 5: mean 8/3, standard error
    sd([3, 0, 5]) / sqrt(3), from numpy; all 5 dimensions are narrow in some image, and with
    image 2 left out only the 3 of image 0."""
    variances = torch.tensor([[0.1, 0.499, 0.01, 0.501, 1.0],
                              [0.5, 0.9, 1.2, 2.0, 0.7],
                              [0.2, 0.2, 0.2, 0.2, 0.2]])
    result = vae_latent_opt.prior_outside_latents(torch.zeros(3, 5), variances.log(),
                                                  torch.randn(50, 5), seed=1)
    counts = np.array([3, 0, 5])
    assert result["narrow_variance"] == 0.5
    assert result["narrow_dimensions"]["mean"] == pytest.approx(counts.mean())
    assert result["narrow_dimensions"]["se"] == pytest.approx(counts.std(ddof=1) / np.sqrt(3))
    assert result["narrow_in_any_image"] == 5
    two = vae_latent_opt.prior_outside_latents(torch.zeros(2, 5), variances[:2].log(),
                                               torch.randn(50, 5), seed=1)
    assert two["narrow_in_any_image"] == 3 and two["narrow_dimensions"]["mean"] == 1.5


def test_shuffling_each_dimension_removes_exactly_the_correlations_part_of_the_kl():
    """Closed forms. Independent dimensions (means of variance 0.7, own variance 0.3: total 1):
    the KL is only sampling noise, d (d + 1) / (4 n) v^2 + d v / (2 n) = 0.165 nats to first
    order (Wishart moments) for n = 2,000, d = 50, with or without the shuffle. Copy one
    dimension's means into another (correlation 0.7): the full KL grows by
    -log(1 - 0.7^2) / 2 = 0.337, the shuffled one does not."""
    gen = torch.Generator().manual_seed(1)
    n, d, v = 2000, 50, 0.7
    mu = torch.randn(n, d, generator=gen, dtype=torch.float64) * v ** 0.5
    logvar = torch.full((n, d), math.log(1 - v), dtype=torch.float64)
    noise = d * (d + 1) / (4 * n) * v ** 2 + d * v / (2 * n)
    assert model.aggregate_posterior_kl(mu, logvar) == pytest.approx(noise, rel=0.15)
    assert vae_latent_opt.kl_without_correlations(mu, logvar, seed=3) == pytest.approx(noise, rel=0.15)
    mu[:, 1] = mu[:, 0]
    full = model.aggregate_posterior_kl(mu, logvar)
    shuffled = vae_latent_opt.kl_without_correlations(mu, logvar, seed=3)
    assert full - shuffled == pytest.approx(-0.5 * math.log(1 - v ** 2), abs=0.05)
    assert shuffled == pytest.approx(noise, rel=0.15)


def with_outside(share, draws=1000):
    return {"outside": {"mean": share, "se": math.sqrt(share * (1 - share) / draws)}, "draws": draws}


@pytest.mark.parametrize("lo_share, expected", [(0.3, "same"), (0.341, "same"), (0.342, "more"),
                                                (0.260, "same"), (0.259, "fewer"), (1.0, "more")])
def test_more_prior_draws_fall_outside_than_q1s_by_the_two_proportion_test(lo_share, expected):
    """1,000 draws each, Q1's share 0.3: two pooled standard errors of the difference are
    2 sqrt(p (1 - p) 2 / 1000) with p the pooled share, 0.0417 at 0.321 and 0.0402 at 0.28."""
    assert vae_latent_opt.outside_gap(with_outside(lo_share), with_outside(0.3)) == expected
    verdicts = vae_latent_opt.q3_verdicts({}, None, outside=with_outside(lo_share),
                                          outside_amortized=with_outside(0.3))
    assert verdicts["outside_gap"] == expected
    assert "outside_gap" not in vae_latent_opt.q3_verdicts({}, None, outside=with_outside(0.3))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_equal_shares_of_prior_draws_outside_are_the_same_even_at_0_or_1(share):
    assert vae_latent_opt.outside_gap(with_outside(share), with_outside(share)) == "same"


@pytest.mark.parametrize("aggregate,mostly", [(0.2501, True), (0.25, False), (0.2499, False)])
def test_blur_is_mostly_the_decoders_when_its_own_latents_already_decode_greyer(aggregate, mostly):
    """Amortized samples 0.2 grey, prior draws through this decoder 0.3: with its own training
    latents at 0.25 the two parts are equal; above that the decoder's part is the larger."""
    grey = {"latent_opt": 0.3, "amortized": 0.2}
    versus = {"prior": {"share": 0.3}, "aggregate": {"share": aggregate}}
    assert vae_latent_opt.q3_verdicts({}, None, grey=grey, versus=versus)["blur_mostly_decoder"] is mostly
    assert vae_latent_opt.q3_verdicts({}, None, grey=grey)["blur_mostly_decoder"] is None


def control(kl, prior=0.5, aggregate=0.3, se=0.01):
    return {"aggregate_posterior_kl": kl,
            "prior_vs_aggregate": {"prior": {"share": prior, "se": se},
                                   "aggregate": {"share": aggregate, "se": se}}}


@pytest.mark.parametrize("ours, theirs, decides", [(9.99, 10.0, True), (9.99, 9.99, False),
                                                  (10.0, 500.0, False)])
def test_the_start_decides_when_only_the_control_started_wider_ends_far(ours, theirs, decides):
    """Far: a moment-matched KL of 0.05 nats per dimension or more (10 nats at d = 200). The
    start decides only where Q3's latents end near N(0, I) and the control's do not."""
    v = vae_latent_opt.q3_verdicts({}, None, aggregate_kl=ours, latent_dim=200,
                                   control=control(theirs))
    assert v["start_decides"] is decides
    assert "start_decides" not in vae_latent_opt.q3_verdicts({}, None, aggregate_kl=ours,
                                                             latent_dim=200)


@pytest.mark.parametrize("control_prior, greyer", [(0.4401, True), (0.4399, False)])
def test_the_controls_prior_is_greyer_beyond_two_standard_errors_of_the_two_gaps(control_prior,
                                                                               greyer):
    """Q3's gap is 0.4 - 0.3 = 0.1, the control's control_prior - 0.3; four SEs of 0.01 make
    two standard errors of the difference 2 * sqrt(4) * 0.01 = 0.04: the line is at 0.44."""
    v = vae_latent_opt.q3_verdicts({}, None, aggregate_kl=1.0, latent_dim=200,
                                   versus=versus(0.4, 0.3),
                                   control=control(500.0, control_prior, 0.3))
    assert v["control_prior_greyer"] is greyer


def test_the_unit_sigma_control_starts_every_sigma_at_one():
    """Untrained (0 epochs): every sigma_i^2 = 1 and the means are Q3's, so the marginal
    variance is 1 + 1 = 2 with no narrow dimension; Q3's own start (sigma^2 ~ chi^2_1) has the
    same marginal variance in expectation. Trained one epoch, its prior draws are scored."""
    x = torch.rand(4000, 1, 28, 28) * 2 - 1
    result = vae_latent_opt.unit_sigma_control(x, 8, 0, 64, 1e-3, 1e-2, 0, torch.device("cpu"))
    assert result["unit_sigma"] and result["start_scale"] == 1.0
    assert result["at_start"]["marginal_variance_mean"] == pytest.approx(2, rel=0.05)
    assert result["marginal_variance_mean"] == pytest.approx(2, rel=0.05)
    assert result["prior_outside"]["narrow_dimensions"]["mean"] == 0
    trained = vae_latent_opt.unit_sigma_control(x[:64], 8, 1, 64, 1e-3, 1e-2, 0,
                                                torch.device("cpu"))
    # one Adam step per latent moves r_i = 0 by about the learning rate: no dimension narrows
    assert trained["prior_outside"]["narrow_dimensions"]["mean"] == 0
    assert trained["prior_outside"]["draws"] == vae_latent_opt.utils.QUALITY_SAMPLES


def test_digit_order_names_digits_from_ordered_latents_and_guesses_from_random_ones():
    """Oracles: latents placed in ten tight, far-apart clusters by digit carry all the order (every
    image named right); latents drawn at random carry none (about 1 in 10, within four binomial
    standard errors). The standard error is the binomial one, from numpy."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(10).repeat(100)
    ordered = 10.0 * torch.eye(10)[labels] + 0.01 * torch.randn(1000, 10, generator=gen)
    got = vae_latent_opt.digit_order(ordered, labels, seed=0)
    assert got == {"mean": 1.0, "se": 0.0, "neighbours": 5}
    random = vae_latent_opt.digit_order(torch.randn(1000, 10, generator=gen), labels, seed=0)
    assert abs(random["mean"] - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 1000)
    share = random["mean"]
    assert random["se"] == pytest.approx(np.sqrt(share * (1 - share) / 999))


def test_narrow_from_start_counts_each_images_narrow_dimensions_then_and_now():
    """Crafted variances, 2 images x 4 dimensions: at the start 3 and 1 narrow (below 1/2), at
    the end 2 and 2, of which 2 and 0 were narrow at the start too."""
    start = torch.tensor([[0.1, 0.2, 0.3, 1.0], [0.4, 1.0, 1.0, 1.0]])
    end = torch.tensor([[0.2, 0.9, 0.3, 0.6], [0.6, 0.1, 0.2, 1.0]])
    got = vae_latent_opt.narrow_from_start(start.log(), end.log())
    largest = max(abs(math.log(e / s)) for e, s in zip(end.flatten().tolist(),
                                                       start.flatten().tolist()))
    assert got == pytest.approx({"at_start": 2.0, "at_end": 2.0, "at_both": 1.0,
                                 "max_log_variance_change": largest})
    assert largest == pytest.approx(math.log(10))     # 1.0 -> 0.1 in the second image
    # Q3's own initialization: sigma ~ N(0, 1), so P(sigma^2 < 1/2) = P(|Z| < sqrt(1/2))
    _, logvar = vae_latent_opt.init_latents(2000, 50, seed=3)
    share = vae_latent_opt.narrow_from_start(logvar, logvar)["at_start"] / 50
    assert share == pytest.approx(2 * scipy.stats.norm.cdf(0.5 ** 0.5) - 1, abs=0.01)


@pytest.mark.parametrize("unit_ratio, unit_outside, variety, outside", [
    (0.47, 0.009, "same", "same"), (0.30, 0.009, "larger", "same"),
    (0.70, 0.5, "smaller", "more")])
def test_unit_sigma_verdicts_compare_the_control_with_q3_and_q1(unit_ratio, unit_outside,
                                                                variety, outside):
    """The control's variety ratio against Q3's (0.47 ± 0.01) and its share of prior draws
    outside against Q1's (9 of 1,000), each by its two-standard-error rule."""
    def versus(ratio):
        return {"variety_ratio": {"ratio": ratio, "se": 0.01}}
    def outside_of(share):
        return {"outside": {"mean": share, "se": 0.0}, "draws": 1000}
    unit = {"prior_vs_aggregate": versus(unit_ratio), "prior_outside": outside_of(unit_outside)}
    got = vae_latent_opt.unit_sigma_verdicts(unit, versus(0.47), outside_of(0.009))
    assert got == {"unit_variety_gap": variety, "unit_outside_gap": outside}
    assert vae_latent_opt.unit_sigma_verdicts(unit, versus(0.47), None)["unit_outside_gap"] is None


def test_the_control_starts_its_means_wider_and_leaves_the_runs_random_stream_alone():
    """Untrained (0 epochs), the control's latents are Q3's initialization with the means
    scaled: marginal variance WIDE_START^2 + E[sigma^2] = 9 + 1 (sigma ~ N(0, 1)), the closed
    form; Q3's own start has 1 + 1. Whatever it draws, the caller's generator continues as if it had not run."""
    x = torch.rand(4000, 1, 28, 28) * 2 - 1
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    result = vae_latent_opt.wide_start_control(x, 8, 0, 64, 1e-3, 1e-2, 0, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    assert result["marginal_variance_mean"] == pytest.approx(
        vae_latent_opt.WIDE_START ** 2 + 1, rel=0.05)
    assert result["at_start"]["marginal_variance_mean"] == pytest.approx(10, rel=0.05)
    assert result["q3_at_start"]["marginal_variance_mean"] == pytest.approx(2, rel=0.05)
    trained = vae_latent_opt.wide_start_control(x[:64], 8, 1, 64, 1e-3, 1e-2, 0,
                                                torch.device("cpu"))
    assert math.isfinite(trained["aggregate_posterior_kl"])
