"""ppca_pca.py (Uppsala lab): PCA and probabilistic PCA against independent oracles
(torch.distributions.MultivariateNormal, scikit-learn's PCA, plain Gaussian conditioning with
full matrices), the lab's answers from crafted errors, and the script end to end."""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import confusion_matrix, precision_score
from torch.distributions import MultivariateNormal

import ppca_pca


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    n, dim = 400, 12
    basis = torch.randn(dim, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0],
                                                                                   dtype=torch.float64)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64) @ basis.T
    x = x + 0.3 * torch.randn(n, dim, generator=gen, dtype=torch.float64) + 5.0
    return x


def test_log_likelihood_matches_multivariate_normal(data):
    gen = torch.Generator().manual_seed(1)
    dim = data.shape[1]
    w = torch.randn(dim, 2, generator=gen, dtype=torch.float64)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    log_sigma2 = torch.tensor(math.log(0.7), dtype=torch.float64)
    ref = MultivariateNormal(mu, w @ w.T + 0.7 * torch.eye(dim, dtype=torch.float64)).log_prob(data)
    torch.testing.assert_close(ppca_pca.ppca_log_likelihood(data, w, mu, log_sigma2), ref,
                               rtol=1e-10, atol=1e-8)


def test_closed_form_matches_sklearn_and_its_score_samples(data):
    mean, evals, evecs = ppca_pca.covariance_eigen(data)
    w, mu, log_sigma2 = ppca_pca.ppca_closed_form(mean, evals, evecs, m=2)
    skl = PCA(n_components=2).fit(data.numpy())
    n = len(data)
    # sklearn's variances divide by N - 1, the maximum-likelihood ones by N
    assert math.exp(log_sigma2.item()) * n / (n - 1) == pytest.approx(skl.noise_variance_, rel=1e-9)
    torch.testing.assert_close(mu, torch.from_numpy(skl.mean_))
    angles = ppca_pca.subspace_angles_deg(w, torch.from_numpy(skl.components_.T))
    assert max(angles) < 1e-5
    # Our log-likelihood at sklearn's own parameters equals sklearn's score_samples.
    w_skl = torch.from_numpy(skl.components_.T * (skl.explained_variance_ - skl.noise_variance_) ** 0.5)
    ours = ppca_pca.ppca_log_likelihood(data, w_skl, torch.from_numpy(skl.mean_),
                                        torch.tensor(math.log(skl.noise_variance_),
                                                     dtype=torch.float64))
    torch.testing.assert_close(ours, torch.from_numpy(skl.score_samples(data.numpy())),
                               rtol=1e-10, atol=1e-8)


def test_closed_form_is_a_maximum(data):
    mean, evals, evecs = ppca_pca.covariance_eigen(data)
    params = [p.clone().requires_grad_() for p in ppca_pca.ppca_closed_form(mean, evals, evecs)]
    ll = ppca_pca.ppca_log_likelihood(data, *params).mean()
    ll.backward()
    for p in params:
        assert p.grad.abs().max().item() < 1e-8
    # a gradient-ascent step from it (or any small random move) does not improve it
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(5):
            moved = [p + 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            assert ppca_pca.ppca_log_likelihood(data, *moved).mean() <= ll + 1e-12


def test_shrinkage_error_is_exactly_ppcas_extra_squared_error_over_pca(data):
    """Q4.6's identity: decoding the closed-form PPCA's posterior mean costs exactly
    sum_i (sigma^2 / lambda_i)^2 y_i^2 more than PCA's projection (measured here with sklearn's
    PCA reconstruction and our posterior, on images other than the fitted ones)."""
    train, test = data[:150], data[150:]
    mean, evals, evecs = ppca_pca.covariance_eigen(train)
    skl = PCA(n_components=2).fit(train.numpy())
    pca_err = (test - torch.from_numpy(skl.inverse_transform(skl.transform(test.numpy())))
               ).pow(2).sum(1).mean().item()
    w, mu, log_sigma2 = ppca_pca.ppca_closed_form(mean, evals, evecs)
    z, _ = ppca_pca.ppca_posterior(test, w, mu, log_sigma2)
    ppca_err = (test - (z @ w.T + mu)).pow(2).sum(1).mean().item()
    assert ppca_err > pca_err
    assert ppca_pca.shrinkage_error(test, mean, evals, evecs) == pytest.approx(
        ppca_err - pca_err, rel=1e-9)


def test_posterior_matches_gaussian_conditioning(data):
    gen = torch.Generator().manual_seed(4)
    dim = data.shape[1]
    w = torch.randn(dim, 2, generator=gen, dtype=torch.float64)
    mu = data.mean(0)
    sigma2 = 0.5
    mean, cov = ppca_pca.ppca_posterior(data, w, mu, torch.tensor(math.log(sigma2),
                                                                  dtype=torch.float64))
    c = w @ w.T + sigma2 * torch.eye(dim, dtype=torch.float64)
    ref_mean = (data - mu) @ torch.linalg.solve(c, w)          # W^T C^-1 (x - mu)
    ref_cov = torch.eye(2, dtype=torch.float64) - w.T @ torch.linalg.solve(c, w)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(cov, ref_cov)


def test_pca_encoding_matches_sklearn_up_to_sign(data):
    mean, evals, evecs = ppca_pca.covariance_eigen(data)
    z = ppca_pca.pca_encode(data, mean, evecs[:, :2])
    ref = torch.from_numpy(PCA(n_components=2).fit(data.numpy()).transform(data.numpy()))
    signs = torch.sign((z * ref).sum(0))
    torch.testing.assert_close(z * signs, ref, rtol=1e-8, atol=1e-8)
    # and decoding the encoding is the orthogonal projection onto the principal subspace
    recon = ppca_pca.pca_decode(z, mean, evecs[:, :2])
    resid = data - recon
    torch.testing.assert_close(resid @ evecs[:, :2], torch.zeros(len(data), 2, dtype=torch.float64),
                               rtol=0, atol=1e-9)


def test_mean_log_likelihood_from_moments_matches_multivariate_normal(data):
    gen = torch.Generator().manual_seed(2)
    dim = data.shape[1]
    w = torch.randn(dim, 2, generator=gen, dtype=torch.float64)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    ref = MultivariateNormal(mu, w @ w.T + 0.3 * torch.eye(dim, dtype=torch.float64)).log_prob(data)
    mean, evals, evecs = ppca_pca.covariance_eigen(data)
    cov = (evecs * evals) @ evecs.T
    ours = ppca_pca.ppca_mean_log_likelihood(mean, cov, w, mu, torch.tensor(math.log(0.3),
                                                                             dtype=torch.float64))
    assert ours.item() == pytest.approx(ref.mean().item(), rel=1e-10)


def test_gradient_fit_converges_to_the_closed_form(data):
    """Issue 10's bar: sigma^2 and the eigenvalues of W^T W within 2 % of the closed form, and
    the stopping rule (not the iteration cap) ends the fit."""
    from tqdm import tqdm

    mean, evals, evecs = ppca_pca.covariance_eigen(data)
    cov = (evecs * evals) @ evecs.T
    w_cf, _, ls_cf = ppca_pca.ppca_closed_form(mean, evals, evecs)
    with tqdm(disable=True) as bar:
        (w, mu, ls), curve, info = ppca_pca.fit_ppca_gradient(mean, cov, lr=0.01, tol=1e-7,
                                                              max_iter=50_000, seed=0, progress=bar)
    assert info["converged"] and info["iterations"] < 50_000 and curve[-1] > curve[0]
    assert ls.exp().item() == pytest.approx(ls_cf.exp().item(), rel=0.02)
    eig = torch.linalg.eigvalsh(w.T @ w)
    torch.testing.assert_close(eig, torch.linalg.eigvalsh(w_cf.T @ w_cf), rtol=0.02, atol=0)
    assert max(ppca_pca.subspace_angles_deg(w, w_cf)) < 1
    torch.testing.assert_close(mu, mean, rtol=0, atol=1e-3)


def crafted_results(pca, ppca, vae, se=0.01, named=None, blurred_kept=None):
    """Per-digit errors for PCA, PPCA and the VAE (dicts digit -> error) in metrics' shape, each
    digit's standard error `se`, and the digit its reconstructions are named most (`named`:
    digit -> digit, for PCA; every digit survives by default)."""
    named, blurred_kept = named or {}, blurred_kept or {}

    def method(per, named):
        return {"test_sq_error": sum(per.values()) / 10,
                "test_sq_error_per_digit": {str(d): v for d, v in per.items()},
                "test_sq_error_se_per_digit": {str(d): se for d in per},
                "nearest_digit": {"per_digit": {
                    str(d): {"kept": 0.2 if d in named else 0.9, "named_most": named.get(d, d)}
                    for d in per}}}
    results = {"pca": method(pca, named), "ppca_gradient": method(ppca, {}), "vae": method(vae, {}),
               "blurred_test_images": {"nearest_digit": {"per_digit": {
                   str(d): {"kept": blurred_kept.get(d, 0.8)} for d in range(10)}}}}
    results["vae"]["gain_over_ppca"] = {str(d): {"mean": ppca[d] - vae[d], "se": se} for d in pca}
    return results


def test_figure_1_shows_per_digit_the_clearest_image_named_as_most_of_that_digits_are():
    """Each pick is an image of its digit whose name by every method is that method's most
    frequent name for the digit (numpy's counts the oracle); where no image is typical for both
    methods, for the first; among those, the one whose smaller margin over the methods in use
    is largest (a crafted margin per method and image)."""
    rng = np.random.default_rng(5)
    labels = torch.as_tensor(rng.integers(0, 10, 2000))
    first = torch.where(torch.as_tensor(rng.random(2000)) < 0.6, (labels + 3) % 10, labels)
    second = torch.where(torch.as_tensor(rng.random(2000)) < 0.3, (labels + 1) % 10, labels)
    # digit 7: the images typical for the first method (named 0) are never typical for the
    # second, which names them 1, 2 or 3 (about 20 % each) and the other 7s as 7 (40 %)
    sevens = labels == 7
    second[sevens] = 7
    spread = sevens & (first == 0)
    second[spread] = 1 + torch.arange(int(spread.sum())) % 3
    tables = [ppca_pca.kept_digits(n, labels)["per_digit"] for n in (first, second)]
    margins = torch.as_tensor(1 + rng.random((2, 2000)))
    picks = ppca_pca.typical_outcome_per_digit([first, second], labels, tables,
                                               lambda m, i: margins[m, i])

    def most(names, digit):
        return np.bincount(names.numpy()[labels.numpy() == digit], minlength=10).argmax()

    for digit, i in enumerate(picks.tolist()):
        assert labels[i] == digit and first[i] == most(first, digit)
        both = digit != 7
        assert bool(second[i] == most(second, digit)) is both
        typical = (labels == digit) & (first == most(first, digit))
        if both:
            typical &= second == most(second, digit)
        clearness = margins[:2 if both else 1].min(0).values
        assert clearness[i] == clearness[typical].max()


def test_naming_margin_is_the_nearest_other_digit_over_the_nearest_by_brute_force():
    """Against numpy's pairwise distances: the nearest reference image of another digit than
    the nearest one's, over the nearest; chunks do not change it; a digit missing from the
    reference is never the nearest other one."""
    rng = np.random.default_rng(3)
    reference, ref_labels = rng.random((300, 1, 6, 6)), rng.integers(0, 9, 300)   # no 9
    images = rng.random((50, 1, 6, 6))
    dist = np.linalg.norm(images.reshape(50, 1, -1) - reference.reshape(1, 300, -1), axis=2)
    nearest = dist.argmin(1)
    other = np.where(ref_labels[None, :] == ref_labels[nearest][:, None], np.inf, dist).min(1)
    expected = other / dist.min(1)
    for chunk in (7, 1024):
        got = ppca_pca.naming_margin(torch.as_tensor(images), torch.as_tensor(reference),
                                     torch.as_tensor(ref_labels), chunk=chunk)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert (got >= 1).all()


def test_blur_like_picks_for_each_image_the_box_whose_error_is_nearest_its_target():
    """Q4.1's blur control against scipy: a box mean over the pixels inside the image (the
    box cut at the border) is uniform_filter of the image over uniform_filter of ones. Each
    image gets its own target error, here near a different box's error for each image."""
    import scipy.ndimage
    x = torch.rand(20, 784, generator=torch.Generator().manual_seed(0)).double()
    images = x.view(-1, 28, 28).numpy()

    def box(size):
        ones = scipy.ndimage.uniform_filter(np.ones((28, 28)), size, mode="constant")
        return np.stack([scipy.ndimage.uniform_filter(im, size, mode="constant") / ones for im in images])
    sizes = ppca_pca.BLUR_BOXES
    errors = np.stack([((box(s) - images) ** 2).sum((1, 2)) for s in sizes], 1)   # image x box
    wanted = np.arange(len(images)) % len(sizes)           # each image aims at another box
    target = errors[np.arange(len(images)), wanted] + 1e-3
    expected = np.abs(errors - target[:, None]).argmin(1)
    assert len(set(expected)) > 5                            # the targets pick many sizes
    blurred, boxes, reached = ppca_pca.blur_like(x, torch.from_numpy(target))
    assert boxes.tolist() == [sizes[i] for i in expected]
    assert reached.tolist() == (errors.max(1) >= target).tolist()
    _, _, reached = ppca_pca.blur_like(x, torch.from_numpy(errors.max(1) + 1.0))   # beyond every box
    assert not reached.any()
    for i, k in enumerate(expected):
        assert np.allclose(blurred[i].view(28, 28).numpy(), box(sizes[k])[i])


def crafted_geometry(offset):
    means = {str(d): [float(d), float(d) ** 1.5 + offset] for d in range(10)}
    pairs = [{"digits": [d, d + 1]} for d in range(5)]
    return {"mean_encoding": means, "closest_pairs": pairs}


def test_a_close_pair_is_decoded_as_one_only_when_both_mean_codes_give_the_same_digit():
    """PCA's closest pairs 0-1, 1-2, 2-3: 0 and 1 both decode to 1 (merged), 1 and 2 to 1 and
    3, 2 and 3 both to 3 (merged); the fourth pair, 3-4, is not among the three closest."""
    geometry = {"pca": crafted_geometry(0), "ppca": crafted_geometry(0)}
    named = [1, 1, 3, 3, 3, 5, 6, 7, 8, 9]
    decoded = {"pca": {"named": named}, "ppca": {"named": list(range(10))}}
    merged = ppca_pca.pairs_decoded_as_one(geometry, decoded)["pairs_decoded_as_one"]
    assert merged == {"pca": [[0, 1, 1], [2, 3, 3]], "ppca": []}
    # of all 45 pairs, 0-1 and 2-3, 2-4 and 3-4 (all decoded as 3) decode to one digit
    of_all = ppca_pca.pairs_decoded_as_one(geometry, decoded)["pairs_decoded_as_one_of_all"]
    assert of_all == {"pca": 4, "ppca": 0}


def test_lab_answers_rank_digits_and_compare_methods_from_the_errors():
    pca = {d: 10.0 + d for d in range(10)}                  # 0 best ... 9 worst
    ppca = dict(pca)
    vae = {d: pca[d] - (3.0 if d in (7, 8, 9) else 0.5) for d in range(10)}
    ink = {str(d): 100.0 + d for d in range(10)}
    geometry = {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}
    answers = ppca_pca.lab_answers(crafted_results(pca, ppca, vae), geometry, ink)
    assert answers["best"]["pca"] == ["0", "1", "2"] and answers["worst"]["pca"] == ["9", "8", "7"]
    assert answers["ppca_same_as_pca"] and answers["ppca_error_not_below_pca"]
    assert answers["vae_improved_digits"] == 10
    assert set(answers["vae_largest_gains"]) == {"7", "8", "9"}
    # seven digits gain 0.5 each: the three smallest tie with the other four
    assert sorted(answers["vae_gain_ties"]["best"]) == sorted(set("0123456") - set(answers["vae_smallest_gains"]))
    assert answers["closest_pairs_shared_pca_ppca"] == 3
    # one swap in PPCA's best three changes the verdict; an error below PCA's flips the other
    ppca[2], ppca[5] = ppca[5], ppca[2]
    ppca[0] = 9.0
    answers = ppca_pca.lab_answers(crafted_results(pca, ppca, vae), geometry, ink)
    assert not answers["ppca_same_as_pca"]
    assert sum(ppca.values()) < sum(pca.values()) and not answers["ppca_error_not_below_pca"]


@pytest.mark.parametrize("shift,expected", [(0.0, True), (1e-9, True), (-1e-9, False)])
def test_ppca_not_below_pca_flips_just_below_pcas_error(shift, expected):
    pca = {d: 10.0 + d for d in range(10)}
    ppca = {d: v + (shift * 10 if d == 0 else 0.0) for d, v in pca.items()}
    geometry = {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}
    answers = ppca_pca.lab_answers(crafted_results(pca, ppca, pca), geometry,
                                   {str(d): 1.0 + d for d in range(10)})
    assert answers["ppca_error_not_below_pca"] is expected


@pytest.mark.parametrize("gain,improved", [(0.0, 7), (1e-9, 8), (-1e-9, 7)])
def test_a_digit_counts_as_improved_only_for_a_positive_gain(gain, improved):
    """The VAE improves a digit when its error is below PPCA's; an equal error is no gain."""
    pca = {d: 10.0 + d for d in range(10)}
    vae = {d: pca[d] - (1.0 if d < 7 else gain if d == 7 else 0.0) for d in range(10)}
    geometry = {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, vae), geometry,
                                   {str(d): 1.0 + d for d in range(10)})
    assert answers["vae_improved_digits"] == improved


def test_relative_error_ranks_divide_by_ink_and_crowding_is_the_nearest_other_mean():
    pca = {d: 10.0 for d in range(10)}                  # equal errors: ink alone decides
    ink = {str(d): 1.0 + d for d in range(10)}           # 9 has the most ink
    geometry = {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}
    # digit d's mean code is (d, d^1.5): the nearest other mean of 0 is 1's, at distance sqrt(2)
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca), geometry, ink)
    assert answers["pca_relative_best"] == ["9", "8", "7"]
    assert answers["pca_relative_worst"] == ["0", "1", "2"]
    means = torch.tensor([[float(d), float(d) ** 1.5] for d in range(10)], dtype=torch.float64)
    dist = torch.cdist(means, means).fill_diagonal_(float("inf")).min(1).values
    # errors relative to ink (4.1's fairer measure) that fall as the nearest other mean moves
    # away: crowding ranks them (scipy's Spearman is the oracle; a strictly decreasing relation
    # has rho = -1), though the raw errors, scaled by ink, do not fall with the distance
    pca = {d: (100.0 - dist[d].item()) * ink[str(d)] for d in range(10)}
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca), geometry, ink)
    assert answers["pca_crowding_spearman"] == pytest.approx(
        scipy.stats.spearmanr(dist.numpy(), [pca[d] / ink[str(d)] for d in range(10)])[0])
    assert answers["pca_crowding_spearman"] < -0.65 and answers["pca_crowded_are_worst"]
    assert scipy.stats.spearmanr(dist.numpy(), [pca[d] for d in range(10)])[0] > 0
    # the same errors against a shuffled crowding order: a weak correlation does not count
    pca = {d: (100.0 - dist[(3 * d) % 10].item()) * ink[str(d)] for d in range(10)}
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca), geometry, ink)
    assert answers["pca_crowding_p"] >= 0.05 and not answers["pca_crowded_are_worst"]
    # errors that grow with ink: correlation 1 (against numpy's, the oracle: a line is exact)
    pca = {d: 3.0 * (1.0 + d) for d in range(10)}
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca), geometry, ink)
    assert answers["pca_ink_correlation"] == pytest.approx(1.0)


@pytest.mark.parametrize("ink6,tied", [(7.0, False), (7.85, True)])
def test_the_ranking_relative_to_ink_names_its_ties_by_the_scaled_standard_errors(ink6, tied):
    """Errors about 1 with SE 0.01 everywhere, digit d's ink d + 1: error per ink about 1 / ink
    with SE 0.01 / ink. The best three are 9, 8, 7 (0.100, 0.111, 0.125). Digit 6 at ink 7 (0.143) is
    0.018 behind 7, far beyond two SEs of the difference (0.0038); at ink 7.85 (0.127) it is
    0.0024 behind, within them (0.0036): tied."""
    pca = {d: 1.0 + 0.001 * d for d in range(10)}       # not constant: the correlations exist
    ink = {str(d): float(d + 1) for d in range(10)}
    ink["6"] = ink6
    vae = {d: float(ink[str(d)]) ** 2 for d in range(10)}  # per ink: the ink itself
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, vae),
                                   {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}, ink)
    assert answers["pca_relative_best"] == ["9", "8", "7"]
    assert answers["relative_best"]["ppca_gradient"] == ["9", "8", "7"]
    assert answers["relative_ties"]["pca"]["best"] == (["6"] if tied else [])
    # each method ranked by its own error per ink: the VAE's smallest for the least ink
    assert answers["relative_best"]["vae"] == ["0", "1", "2"]
    assert answers["relative_worst"]["vae"][0] == "9"                  # the most ink


@pytest.mark.parametrize("gap,tied", [(0.28, True), (0.29, False)])
def test_a_digit_ties_with_the_last_of_the_best_three_within_two_standard_errors(gap, tied):
    """Two standard errors of a difference of means with SE 0.1 each: 2 * sqrt(0.02) = 0.283."""
    per = {str(d): 10.0 + d for d in range(10)}
    per["3"] = per["2"] + gap                              # the first digit outside the best three
    per["6"] = per["7"] - gap                              # ...and the last outside the worst three
    ties = ppca_pca.boundary_ties(per, {str(d): 0.1 for d in range(10)})
    assert ties == {"best": ["3"] if tied else [], "worst": ["6"] if tied else []}


def test_lost_digits_and_the_ones_that_turn_into_their_closest_partner():
    """A digit is lost when under half its reconstructions keep it. What it turns into is
    ranked among the other nine digits by the distance of their mean codes to its own (1: the
    nearest), and the count of nearest ones is tested against chance (1 in 9, scipy's binomial
    test as the oracle)."""
    pca = {d: 10.0 + d for d in range(10)}
    geometry = {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}
    # mean codes (d, d^1.5) lie on a curve whose steps grow: each digit's nearest is the one before
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca, named={4: 3, 7: 6, 2: 9}), geometry,
                                   {str(d): 1.0 + d for d in range(10)})
    assert answers["lost"]["pca"] == {"2": 9, "4": 3, "7": 6} and answers["lost"]["vae"] == {}
    assert answers["pca_lost_neighbour_rank"] == {"2": 9, "4": 1, "7": 1}   # 9 is 2's farthest
    assert answers["pca_lost_to_nearest"] == 2
    assert answers["pca_lost_to_nearest_p"] == pytest.approx(
        scipy.stats.binomtest(2, 3, 1 / 9, alternative="greater").pvalue)
    assert answers["pca_lost_to_nearest_p"] < 0.05 and answers["pca_lost_follow_codes"]
    # one nearest of three is what chance gives: no evidence
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca, named={4: 3, 7: 9, 2: 9}), geometry,
                                   {str(d): 1.0 + d for d in range(10)})
    assert answers["pca_lost_to_nearest"] == 1 and not answers["pca_lost_follow_codes"]
    assert answers["kept_order"]["pca"][-3:] == ["2", "4", "7"]
    # errors rise with the digit: 0, 1, 2 best and 9, 8, 7 worst; 2 is lost, 9 and 8 are kept
    assert answers["pca_best_error_but_lost"] == ["2"]
    assert answers["pca_worst_error_but_kept"] == ["9", "8"]
    assert not answers["ppca_loses_the_same_as_pca"]           # PPCA's crafted digits all survive
    # a lost digit still named most often as itself (a plurality under half) turns into no other
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca, named={4: 3, 7: 7}), geometry,
                                   {str(d): 1.0 + d for d in range(10)})
    assert answers["lost"]["pca"] == {"4": 3, "7": 7}
    assert answers["pca_lost_neighbour_rank"] == {"4": 1} and answers["pca_lost_to_nearest"] == 1


def groups_geometry(codes):
    return {k: {"mean_encoding": {str(d): list(c) for d, c in enumerate(codes)},
                "closest_pairs": [{"digits": [0, 1]}]} for k in ("pca", "ppca", "vae")}


# two tight groups, {0, 1, 2} and {5, 6, 7, 8, 9}, and digits 3 and 4 far from both and apart
GROUPED_CODES = [(0, 0), (0.1, 0), (0, 0.1), (-11, 0), (10, 12),
                 (10, 0), (10.1, 0), (10, 0.1), (10.2, 0), (10, 0.2)]


def test_separation_is_fishers_criterion_and_no_linear_map_changes_it():
    """tr(S_W^-1 S_B) against numpy (np.cov of the ten means, the mean of the per-digit
    covariances), and the same for the codes through an invertible linear map (PPCA's codes
    are PCA's so mapped)."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(10).repeat(40)
    z = torch.randn(400, 2, generator=gen, dtype=torch.float64) + 3 * torch.randn(10, 2, generator=gen, dtype=torch.float64)[labels]
    zn, ln = z.numpy(), labels.numpy()
    s_b = np.cov(np.stack([zn[ln == d].mean(0) for d in range(10)]).T)
    s_w = np.mean([np.cov(zn[ln == d].T) for d in range(10)], axis=0)
    separation = ppca_pca.digit_geometry(z, labels)["separation"]
    assert separation == pytest.approx(np.trace(np.linalg.solve(s_w, s_b)), rel=1e-10)
    mapped = z @ torch.tensor([[0.3, -1.2], [0.8, 0.5]], dtype=torch.float64) + 7.0
    assert ppca_pca.digit_geometry(mapped, labels)["separation"] == pytest.approx(separation, rel=1e-10)


def test_code_groups_cut_the_single_linkage_tree_at_its_widest_gap():
    """Hand-made codes: two tight groups and two digits apart. scipy merges at heights of 0.1
    or less inside the groups, then 9.9 (the groups), 11 (digit 3) and 11.8 (digit 4): the
    widest gap, 0.1 to 9.9, is the cut. Moving digit 3 next to group {0, 1, 2} joins it."""
    assert ppca_pca.code_groups(GROUPED_CODES) == [[5, 6, 7, 8, 9], [0, 1, 2], [3], [4]]
    moved = list(GROUPED_CODES)
    moved[3] = (0.1, 0.1)
    assert ppca_pca.code_groups(moved) == [[5, 6, 7, 8, 9], [0, 1, 2, 3], [4]]


@pytest.mark.parametrize("lost, p_below", [((0, 1, 2, 5, 6, 7, 8, 9), True), ((0, 1, 2, 5, 6, 7, 8), False)])
def test_digits_apart_kept_more_often_by_fishers_exact_test(lost, p_below):
    """Digits 3 and 4 lie apart. Losing every crowded digit and neither digit apart: 2 of 2
    apart kept, 0 of 8 crowded; scipy's fisher_exact is the oracle, p = 1/45 < 0.05. Keeping
    one crowded digit more: 2 of 2 against 1 of 8, p = 3/45 > 0.05, no evidence."""
    pca = {d: 10.0 + d for d in range(10)}
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca, named={d: 4 for d in lost}),
                                   groups_geometry(GROUPED_CODES), {str(d): 1.0 + d for d in range(10)})
    assert answers["code_groups"]["pca"] == [[5, 6, 7, 8, 9], [0, 1, 2], [3], [4]]
    apart_kept = sum(d not in lost for d in (3, 4))
    crowded_kept = sum(d not in lost for d in (0, 1, 2, 5, 6, 7, 8, 9))
    assert (answers["pca_apart_kept"], answers["pca_crowded_kept"]) == (apart_kept, crowded_kept)
    expected = scipy.stats.fisher_exact([[apart_kept, 2 - apart_kept], [crowded_kept, 8 - crowded_kept]],
                                        alternative="greater").pvalue
    assert answers["pca_apart_kept_p"] == pytest.approx(expected)
    assert answers["pca_apart_kept_more"] is p_below and bool(expected < 0.05) is p_below


def test_nearest_digit_is_the_label_of_the_closest_reference_image():
    """scikit-learn's 1-NN against a plain distance matrix and argmin (torch.cdist)."""
    gen = torch.Generator().manual_seed(7)
    reference, queries = torch.rand(300, 20, generator=gen), torch.rand(50, 20, generator=gen)
    labels = torch.randint(0, 10, (300,), generator=gen)
    expected = labels[torch.cdist(queries.double(), reference.double()).argmin(1)]
    assert torch.equal(ppca_pca.nearest_digit(queries, reference, labels), expected)


def test_kept_digits_counts_each_digits_survivors_and_what_it_turns_into():
    labels = torch.tensor([0] * 4 + [1] * 5 + list(range(2, 10)))
    named = labels.clone()
    named[:3] = 6                                        # three of the four 0s come back as 6
    named[4] = 7                                         # one 1 of five as 7
    kept = ppca_pca.kept_digits(named, labels)
    assert kept["kept"] == pytest.approx(13 / 17)
    assert {k: kept["per_digit"]["0"][k] for k in ("kept", "named_most", "named_most_share")} == {
        "kept": 0.25, "named_most": 6, "named_most_share": 0.75}
    assert {k: kept["per_digit"]["1"][k] for k in ("kept", "named_most", "named_most_share")} == {
        "kept": 0.8, "named_most": 1, "named_most_share": 0.8}
    # 6 is named four times, once rightly: three false alarms among the 16 images of other digits
    assert kept["per_digit"]["6"]["precision"] == 0.25
    assert kept["per_digit"]["6"]["false_alarm"] == pytest.approx(3 / 16)


def test_false_alarms_and_precision_match_sklearns_confusion_matrix():
    """Per digit, the share of other digits' images named as it (false positives over all
    negatives) and of the images named as it that show it (scikit-learn's precision); a digit
    the rule never names has no precision."""
    gen = torch.Generator().manual_seed(11)
    labels = torch.randint(0, 10, (500,), generator=gen)
    named = torch.where(torch.rand(500, generator=gen) < 0.6, labels,
                        torch.randint(0, 9, (500,), generator=gen))     # 9 is never named wrongly
    named[labels == 9] = 0                                              # nor rightly
    per = ppca_pca.kept_digits(named, labels)["per_digit"]
    cm = confusion_matrix(labels.numpy(), named.numpy(), labels=range(10))
    precision = precision_score(labels.numpy(), named.numpy(), labels=range(10), average=None,
                                zero_division=0)
    for d in range(9):
        false_positives, negatives = cm[:, d].sum() - cm[d, d], len(labels) - cm[d].sum()
        assert per[str(d)]["false_alarm"] == pytest.approx(false_positives / negatives)
        assert per[str(d)]["precision"] == pytest.approx(precision[d])
    assert per["9"]["precision"] is None and per["9"]["false_alarm"] == 0.0


def named_results(kept: dict, false_alarm: dict) -> dict:
    """Metrics' shape for `kept_beyond_false_alarms`: every method with the same shares."""
    per = {str(d): {"kept": kept[d], "false_alarm": false_alarm[d]} for d in range(10)}
    return {k: {"nearest_digit": {"per_digit": per}} for k in ("pca", "ppca_gradient", "vae")}


@pytest.mark.parametrize("third, tied", [(0.50, []), (0.45, ["3"])])
def test_the_share_kept_beyond_false_alarms_ranks_and_ties_the_digits(third, tied):
    """Share kept minus false alarms, best first; the fourth digit ties with the third within
    two standard errors of the difference, each share's binomial error over its own images
    (400 of each digit: 400 kept-or-not, 3,600 others named-or-not)."""
    kept = {0: 0.9, 1: 0.95, 2: 0.5, 3: 0.4, **{d: 0.1 for d in range(4, 10)}}
    false_alarm = {0: 0.2, 1: 0.05, 2: 0.5 - third, 3: 0.0, **{d: 0.05 for d in range(4, 10)}}
    labels = torch.arange(10).repeat_interleave(400)
    answers = ppca_pca.kept_beyond_false_alarms(named_results(kept, false_alarm), labels)
    score = answers["beyond_false_alarms"]["pca"]
    assert score == pytest.approx({str(d): kept[d] - false_alarm[d] for d in range(10)})
    assert answers["beyond_false_alarms_best"]["vae"] == ["1", "0", "2"]
    se = math.sqrt(0.5 * 0.5 / 400 + (0.5 - third) * (0.5 + third) / 3600 + 0.4 * 0.6 / 400)
    assert (third - 0.4 < 2 * se) == bool(tied)       # the oracle: the gap against 2 se
    assert answers["beyond_false_alarms_ties"]["pca"] == tied


def test_paired_gain_is_the_mean_and_standard_error_of_per_image_differences():
    gen = torch.Generator().manual_seed(8)
    x, a, b = (torch.rand(300, 6, generator=gen) for _ in range(3))
    labels = torch.arange(300) % 10
    gain = ppca_pca.paired_gain(x, a, b, labels)
    diff = (((x - a) ** 2).sum(1) - ((x - b) ** 2).sum(1)).double().numpy()
    for d in range(10):
        own = diff[labels.numpy() == d]
        assert gain[str(d)]["mean"] == pytest.approx(own.mean())
        assert gain[str(d)]["se"] == pytest.approx(scipy.stats.sem(own))


def method_results(ll_gap=0.0, vae_error=40.0, ppca_error=43.0, eigenvalues=(5.0, 3.0),
                   sigma2=0.05, vae_elbo=100.0, vae_sigma2=0.04):
    return {"ppca_gradient": {"test_log_likelihood": 14.0 + ll_gap, "test_sq_error": ppca_error},
            "ppca_closed_form": {"test_log_likelihood": 14.0, "data_eigenvalues": list(eigenvalues),
                                 "sigma2": sigma2},
            "vae": {"test_sq_error": vae_error, "test_elbo": vae_elbo, "sigma2": vae_sigma2,
                    "test_kl": 5.0, "test_expected_log_likelihood": vae_elbo + 5.0}}


def method_geometry(vae_sd=(1.0, 1.0), vae_separation=2.0, ppca_separation=1.0,
                    vae_closest=0.1, ppca_closest=0.1, vae_kurtosis=(0.0, 0.0)):
    return {"vae": {"std": list(vae_sd), "separation": vae_separation,
                    "closest_pairs": [{"relative": vae_closest}],
                    "excess_kurtosis": list(vae_kurtosis)},
            "ppca": {"separation": ppca_separation, "closest_pairs": [{"relative": ppca_closest}]}}


@pytest.mark.parametrize("vae_closest,closer", [(0.0999, True), (0.1, False), (0.1001, False)])
def test_the_vaes_closest_pair_is_closer_only_below_ppcas_relative_distance(vae_closest, closer):
    v = ppca_pca.method_verdicts(method_results(), {"subspace_angles_deg": [0.1, 0.1]},
                                 method_geometry(vae_closest=vae_closest))
    assert v["vae_closest_pair_closer"] is closer


@pytest.mark.parametrize("gap,angle,reaches", [(0.0099, 0.99, True), (0.0101, 0.5, False),
                                               (-0.0101, 0.5, False), (0.0, 1.01, False)])
def test_the_gradient_fit_reaches_the_closed_form_within_001_nats_and_one_degree(gap, angle,
                                                                                 reaches):
    v = ppca_pca.method_verdicts(method_results(ll_gap=gap),
                                 {"subspace_angles_deg": [0.1, angle]}, method_geometry())
    assert v["gradient_reaches_closed_form"] is reaches


@pytest.mark.parametrize("elbo, better", [(14.01, True), (13.99, False)])
def test_the_vae_is_the_better_density_model_when_its_elbo_beats_ppcas_likelihood(elbo, better):
    v = ppca_pca.method_verdicts(method_results(vae_elbo=elbo), {"subspace_angles_deg": [0.1]},
                                 method_geometry())
    assert v["vae_better_density"] is better


def test_method_verdicts_scale_separation_shrinkage_and_the_vaes_error():
    angles = {"subspace_angles_deg": [0.1, 0.2]}
    v = ppca_pca.method_verdicts(method_results(), angles, method_geometry())
    # Q4.4: axis i shrinks by sqrt(lambda_i - sigma^2) / lambda_i
    assert v["ppca_second_axis_shrink_ratio"] == pytest.approx(
        (math.sqrt(3.0 - 0.05) / 3.0) / (math.sqrt(5.0 - 0.05) / 5.0))
    assert v["vae_separates_better"] and v["vae_on_prior_scale"] and v["vae_below_ppca"]
    assert v["vae_error_relative_to_ppca"] == pytest.approx(40.0 / 43.0 - 1)
    for sd, on_scale in (((0.5, 2.0), True), ((0.49, 1.0), False), ((1.0, 2.01), False)):
        assert ppca_pca.method_verdicts(method_results(), angles, method_geometry(
            vae_sd=sd))["vae_on_prior_scale"] is on_scale
    equal = ppca_pca.method_verdicts(method_results(vae_error=43.0), angles,
                                     method_geometry(vae_separation=1.0))
    assert not equal["vae_below_ppca"] and not equal["vae_separates_better"]
    # Q4.10: the gap the two noise variances alone make, as torch's Normal gives it at a
    # residual of zero over the lab's 784 pixels
    normal = torch.distributions.Normal
    at_mean = [normal(torch.tensor(0.0, dtype=torch.float64), math.sqrt(s2)).log_prob(
                   torch.zeros(784, dtype=torch.float64)).sum().item()
               for s2 in (0.04, 0.05)]
    assert v["noise_variance_nats"] == pytest.approx(at_mean[0] - at_mean[1])


def test_quick_run_writes_every_method_and_figure(quick_outputs):
    out = quick_outputs / "ppca_pca"
    m = json.loads((out / "metrics.json").read_text())
    for method in ("pca", "ppca_gradient", "ppca_closed_form", "vae"):
        assert m[method]["test_sq_error"] > 0
        assert set(m[method]["test_sq_error_per_digit"]) == {str(d) for d in range(10)}
    assert m["ppca_closed_form"]["test_log_likelihood"] > m["ppca_gradient"]["test_log_likelihood"] - 50
    assert m["ppca_gradient"]["iterations"] > 0 and "initialization" in m["ppca_gradient"]
    assert m["ppca_gradient"]["converged"]
    assert abs(m["ppca_comparison"]["sigma2_relative_error"]) < 0.02
    # 4.6's paired difference: the mean of per-image differences is the difference of the means
    paired = m["ppca_comparison"]["ppca_minus_pca_sq_error"]
    assert paired["mean"] == pytest.approx(m["ppca_gradient"]["test_sq_error"]
                                           - m["pca"]["test_sq_error"], rel=1e-6, abs=1e-9)
    assert 0 < paired["se"] < m["pca"]["test_sq_error_se"]   # the images' own spread cancels
    errors = m["pca"]["test_sq_error_per_digit"]
    # Figure 1 shows, per digit, an image whose PCA reconstruction gets that digit's most frequent name
    per = m["pca"]["nearest_digit"]["per_digit"]
    assert m["pca"]["shown_named"] == [per[str(d)]["named_most"] for d in range(10)]
    # Q4.1's blur control: every test image blurred once, each digit's copies near PCA's error
    blur = m["blurred_test_images"]
    assert sum(blur["box_counts"].values()) == m["test_images"]
    assert all(abs(blur["test_sq_error_per_digit"][d] - errors[d]) < 0.05 * errors[d] for d in errors)
    for name in ("encodings.png", "reconstructions.png", "sq_error_per_digit.png",
                 "ppca_log_likelihood.png", "lattices.png", "samples.png"):
        assert (out / name).is_file(), name


def test_resume_after_sigint_matches_the_uninterrupted_run(tmp_path):
    from conftest import comparable, run_injected, run_script

    # a short PPCA fit: the test is about the VAE epochs that resume, not the fit
    args = ["--quick", "--epochs", "2", "--device", "cpu", "--train-images", "500",
            "--ppca-max-iter", "100"]
    run_script("ppca_pca.py", *args, "--out", tmp_path / "whole")
    proc = run_injected("INT-after-epoch", 1, "ppca_pca.py", *args, "--out", tmp_path / "cut")
    assert proc.returncode == 130 and "interrupted after epoch 1" in proc.stderr
    run_script("ppca_pca.py", *args, "--out", tmp_path / "cut")
    assert comparable(tmp_path / "cut") == comparable(tmp_path / "whole")


def test_labels_cover_no_point_and_no_other_label():
    """Lab Fig. 3: each digit's label sits where no dot is, clear of the other labels, inside
    the axes, and on its mark where the mark itself is free."""
    gen = torch.Generator().manual_seed(5)
    points = (torch.randn(3000, 2, generator=gen) * 60 + 200).double().numpy()
    marks = points[:10] * 0.2 + 160                  # crowded marks, inside the cloud
    box, radius = ((0.0, 0.0), (400.0, 400.0)), 8.0
    spots = ppca_pca.label_positions(marks, points, box, radius)
    nearest_point = torch.cdist(torch.from_numpy(spots), torch.from_numpy(points)).min(1).values
    assert (nearest_point >= 1.5 * radius).all()
    between = torch.cdist(torch.from_numpy(spots), torch.from_numpy(spots))
    assert (between + torch.eye(10) * 1e9 >= 2 * radius).all()
    assert (spots >= radius).all() and (spots <= 400 - radius).all()
    # no two leader lines (mark to label) cross: segments p-q and r-s cross when each pair's
    # ends lie on opposite sides of the other's line
    def side(a, b, c):
        return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))
    for i in range(10):
        for j in range(i + 1, 10):
            p, q, r, s = marks[i], spots[i], marks[j], spots[j]
            assert not (side(p, q, r) * side(p, q, s) < 0 and side(r, s, p) * side(r, s, q) < 0), (i, j)
    far = ppca_pca.label_positions(marks[:1], np.array([[1e6, 1e6]]), box, radius)  # a free mark
    assert abs(far - marks[:1]).max() <= radius / 4


def test_squared_error_per_digit_with_its_standard_error_matches_numpy():
    gen = torch.Generator().manual_seed(6)
    x, recon = torch.rand(200, 5, generator=gen), torch.rand(200, 5, generator=gen)
    labels = torch.arange(200) % 10
    result = ppca_pca.sq_error(x, recon, labels)
    err = ((x - recon).double() ** 2).sum(1).numpy()
    assert result["test_sq_error"] == pytest.approx(err.mean())
    assert result["test_sq_error_se"] == pytest.approx(err.std(ddof=1) / np.sqrt(len(err)))
    for d in range(10):
        own = err[labels.numpy() == d]
        assert result["test_sq_error_per_digit"][str(d)] == pytest.approx(own.mean())
        assert result["test_sq_error_se_per_digit"][str(d)] == pytest.approx(
            own.std(ddof=1) / np.sqrt(len(own)))


@pytest.mark.parametrize("kept,keeps", [(0.5, True), (0.4999, False)])
def test_the_naming_rule_keeps_blurred_digits_only_if_each_keeps_half(kept, keeps):
    """A blurred digit named right less than half the time means blur alone defeats the rule."""
    pca = {d: 10.0 + d for d in range(10)}
    geometry = {k: crafted_geometry(0.0) for k in ("pca", "ppca", "vae")}
    answers = ppca_pca.lab_answers(crafted_results(pca, pca, pca, blurred_kept={8: kept}), geometry,
                                   {str(d): 1.0 + d for d in range(10)})
    assert answers["namer_keeps_blurred_digits"] is keeps


def test_mid_grey_share_counts_pixels_strictly_inside_the_band():
    images = torch.tensor([0.0, 0.1, 0.11, 0.5, 0.89, 0.9, 1.0, 0.05])
    assert ppca_pca.mid_grey_share(images) == pytest.approx(3 / 8)          # 0.11, 0.5, 0.89


def test_prior_samples_of_a_constant_decoder_are_judged_by_its_image():
    """PPCA with W = 0 decodes every z to mu; a VAE stand-in decodes every z to the same image:
    each share is then that image's share of mid-grey pixels."""
    class Flat(torch.nn.Module):
        def decode(self, z):
            return torch.full((len(z), 784), 0.5)

    mu = torch.cat([torch.zeros(392), torch.full((392,), 0.3)]).double()
    blur = ppca_pca.prior_sample_blur(torch.zeros(784, 2).double(), mu, Flat(),
                                      torch.ones(5, 784), seed=0, device="cpu")
    assert blur["ppca"] == pytest.approx(0.5) and blur["vae"] == 1.0
    assert blur["test_images"] == 0.0 and blur["samples"] == ppca_pca.PRIOR_SAMPLES


def test_a_digits_decoded_mean_code_is_its_mean_images_projection_and_named_by_the_rule():
    """'Decoded' (4.1, 4.5, 4.9): PCA decodes linearly, so a digit's decoded mean code is the
    projection of the digit's mean image, here scikit-learn's; and each decoded image is named
    by its nearest reference image, here the ten decoded images themselves under shuffled
    labels, so the names are those labels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, ppca_pca.D, generator=gen, dtype=torch.float64)
    labels = torch.arange(300) % 10
    eigen = ppca_pca.covariance_eigen(x)
    z = ppca_pca.pca_encode(x, eigen[0], eigen[2][:, :ppca_pca.LATENT])
    w = torch.randn(ppca_pca.D, ppca_pca.LATENT, generator=gen, dtype=torch.float64)
    geometry = {k: ppca_pca.digit_geometry(z, labels) for k in ("pca", "ppca", "vae")}
    images = ppca_pca.mean_code_images(geometry, eigen, (w, x.mean(0)), ppca_pca.LabVAE().eval(),
                                       "cpu")
    assert {k: tuple(v.shape) for k, v in images.items()} == {k: (10, ppca_pca.D)
                                                              for k in ("pca", "ppca", "vae")}
    sk = PCA(ppca_pca.LATENT, svd_solver="full").fit(x.numpy())     # exact, not randomized
    means = np.stack([x[labels == d].mean(0).numpy() for d in range(10)])
    np.testing.assert_allclose(images["pca"].numpy(), sk.inverse_transform(sk.transform(means)),
                               atol=1e-9)
    shuffled = torch.tensor([3, 1, 0, 2, 4, 9, 6, 8, 7, 5])
    named = ppca_pca.decoded_mean_codes({"pca": images["pca"]}, images["pca"], shuffled)
    assert named == {"pca": {"named": shuffled.tolist(), "own": [1, 4, 6]}}


def test_a_lost_digit_is_lost_beyond_blur_only_more_than_two_standard_errors_below_it():
    """Q4.1's blur control per digit, 1,000 images each: PCA 10 % kept against blur's 40 % is
    lost beyond blur; 13 % against 6 %, and 24 % against 24 %, are not; a kept digit (90 %) is
    in neither list. The difference's standard error: sqrt((a(1-a) + b(1-b)) / n)."""
    shares = {"pca": [0.10, 0.13, 0.24, 0.90] + [0.9] * 6,
              "blurred_test_images": [0.40, 0.06, 0.24, 0.50] + [0.9] * 6}
    results = {k: {"nearest_digit": {"per_digit": {str(d): {"kept": v[d]} for d in range(10)}}}
               for k, v in shares.items()}
    labels = torch.arange(10).repeat_interleave(1000)
    assert ppca_pca.lost_beyond_blur(results, labels) == {"pca_lost_beyond_blur": [0],
                                                          "pca_lost_as_blur": [1, 2]}
    # near the line: 2.2 standard errors (2.16 with blur's own larger share) count, 1.8 do not
    se = math.sqrt((0.3 * 0.7 + 0.3 * 0.7) / 1000)
    for gap, beyond in ((2.2 * se, [0]), (1.8 * se, [])):
        shares = {"pca": [0.3] + [0.9] * 9, "blurred_test_images": [0.3 + gap] + [0.9] * 9}
        results = {k: {"nearest_digit": {"per_digit": {str(d): {"kept": v[d]} for d in range(10)}}}
                   for k, v in shares.items()}
        assert ppca_pca.lost_beyond_blur(results, labels)["pca_lost_beyond_blur"] == beyond


def test_q410s_lead_splits_into_four_terms_as_torchs_densities_give_them():
    """The VAE's ELBO minus PPCA's log-likelihood (Q4.10) split into noise variance, PPCA's two
    wider directions, the misfits and the KL: each term against torch's densities in 784-D."""
    gen = torch.Generator().manual_seed(0)
    d, lam, s2_ppca, s2_vae, kl = 784, (5.0, 3.0), 0.05, 0.03, 4.0
    basis = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))[0]
    cov = (s2_ppca * torch.eye(d, dtype=torch.float64)
           + (basis * (torch.tensor(lam, dtype=torch.float64) - s2_ppca)) @ basis.T)
    mu = torch.rand(d, generator=gen, dtype=torch.float64)
    ppca = torch.distributions.MultivariateNormal(mu, cov)
    x = mu + torch.randn(50, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    f = x + 0.2 * torch.randn(50, d, generator=gen, dtype=torch.float64)   # the VAE's f(z)
    vae_ll = torch.distributions.Normal(f, math.sqrt(s2_vae)).log_prob(x).sum(1).mean().item()
    closed = {"sigma2": s2_ppca, "data_eigenvalues": list(lam),
              "test_log_likelihood": ppca.log_prob(x).mean().item()}
    vae = {"sigma2": s2_vae, "test_expected_log_likelihood": vae_ll, "test_kl": kl}
    terms = ppca_pca.elbo_lead_terms(closed, vae)
    lead = vae_ll - kl - closed["test_log_likelihood"]
    assert sum(terms[k] for k in ("noise_variance", "ppca_principal_directions", "misfit", "kl")) \
        == pytest.approx(lead, abs=1e-8)
    diff = x - mu
    assert terms["ppca_misfit"] == pytest.approx(
        0.5 * torch.einsum("ni,ij,nj->n", diff, torch.linalg.inv(cov), diff).mean().item())
    assert terms["vae_misfit"] == pytest.approx(((x - f) ** 2).sum(1).mean().item() / (2 * s2_vae))
    assert terms["ppca_principal_directions"] == pytest.approx(
        0.5 * (torch.logdet(cov).item() - d * math.log(s2_ppca)))
    assert terms["kl"] == -kl


@pytest.mark.parametrize("kurtosis, heavy", [((0.2, 1.01), True), ((1.0, -0.5), False)])
def test_the_vaes_codes_are_heavy_tailed_when_a_coordinates_excess_kurtosis_passes_1(kurtosis,
                                                                                    heavy):
    v = ppca_pca.method_verdicts(method_results(), {"subspace_angles_deg": [0.1]},
                                 method_geometry(vae_kurtosis=kurtosis))
    assert v["vae_heavy_tails"] is heavy


def test_the_codes_excess_kurtosis_is_scipys():
    """Q4.8's tails: per coordinate, scipy's (Fisher's, biased) excess kurtosis: about 0 for
    Gaussian codes, 3 for Laplace ones."""
    gen = torch.Generator().manual_seed(8)
    u = torch.rand(4000, generator=gen, dtype=torch.float64) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())            # by its inverse CDF
    z = torch.stack([torch.randn(4000, generator=gen, dtype=torch.float64), laplace], 1)
    labels = torch.arange(4000) % 10
    got = ppca_pca.digit_geometry(z, labels)["excess_kurtosis"]
    assert got == pytest.approx(scipy.stats.kurtosis(z.numpy(), axis=0).tolist(), rel=1e-9)
    assert abs(got[0]) < 0.3 and 2 < got[1] < 4
