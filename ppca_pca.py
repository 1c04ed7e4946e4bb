"""Uppsala APML lab: PCA, probabilistic PCA and a VAE with a 2-D latent, compared on MNIST.

Full MNIST (60,000 training, 10,000 test images), pixels in [0, 1], images as 784-vectors,
M = 2 latent dimensions. Answers lab questions 4.1 to 4.10 with figures and metrics.json; the
derivations 3.1 to 3.5 are in the report.
"""
# Use of AI tools (the Uppsala lab asks for no such note; HUJI's Sec. 4.1.1 does, and this
# repository keeps one in every file): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial
import scipy.stats
import torch
import torch.nn as nn
from sklearn.neighbors import KNeighborsClassifier
from tqdm import tqdm

import model as vae_model
import utils

LATENT = 2
D = 784
# Training images a reconstruction is compared with to name its digit (1-nearest neighbour):
# 10,000 name about 95 % of the original test images right, in seconds; all 60,000 take 4x as long.
NEIGHBOUR_IMAGES = 10_000
# The decoded lattice of 4.9: LATTICE x LATTICE latents, evenly spaced over [-2, 2]^2.
LATTICE = 9                # 0.5 apart: a tile large enough to read at the lab's print size
# Test images drawn in the encodings' scatter plots (all 10,000 are used for every number).
SCATTER_POINTS = 2_500
# Q4.10's prior samples, judged by blur: the share of mid-grey pixels (strictly between
# GREY_BAND and 1 - GREY_BAND, neither background nor stroke) in PRIOR_SAMPLES draws.
GREY_BAND, PRIOR_SAMPLES = 0.1, 1_000
# The box blurs (odd sizes, up to nearly the whole image) among which Q4.1's blur control picks,
# image by image, the one nearest PCA's error for that image.
BLUR_BOXES = tuple(range(3, 28, 2))
DIGITS = [str(d) for d in range(10)]     # the keys of every per-digit table


# ----------------------------------------------------------------------------------------------
# PCA (3.1, 3.2)
# ----------------------------------------------------------------------------------------------
def covariance_eigen(x: torch.Tensor):
    """Mean, and eigenvalues (descending) and eigenvectors of the sample covariance
    S = Xc^T Xc / N, in float64. The eigenvectors are the right singular vectors V of the
    centred data matrix Xc = U Sigma V^T and the eigenvalues are Sigma^2 / N."""
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    evals, evecs = torch.linalg.eigh(xc.T @ xc / len(x))
    return mean, evals.flip(0), evecs.flip(1)


def pca_encode(x, mean, v):
    """Eq. (1) with centring (3.1, 3.2): z^T = (x - mean)^T [v_1 ... v_M]."""
    return (x.double() - mean) @ v


def pca_decode(z, mean, v):
    """Eq. (2) with the mean added back: x~^T = z^T [v_1 ... v_M]^T + mean^T."""
    return z @ v.T + mean


# ----------------------------------------------------------------------------------------------
# Probabilistic PCA (3.3, 3.4)
# ----------------------------------------------------------------------------------------------
def ppca_log_likelihood(x, w, mu, log_sigma2):
    """Per-image log N(x; mu, C), C = W W^T + sigma^2 I (3.3), without forming C (D x D):
    with Mm = W^T W + sigma^2 I (M x M),
      C^-1 = (I - W Mm^-1 W^T) / sigma^2               (Woodbury identity)
      log|C| = (D - M) log sigma^2 + log|Mm|           (matrix determinant lemma)."""
    d, m = w.shape
    sigma2 = torch.exp(log_sigma2)
    mm = w.T @ w + sigma2 * torch.eye(m, dtype=w.dtype, device=w.device)
    e = x - mu
    proj = torch.linalg.solve(mm, (e @ w).T).T                    # Mm^-1 W^T e, (N, M)
    quad = (e.pow(2).sum(1) - ((e @ w) * proj).sum(1)) / sigma2
    logdet = (d - m) * log_sigma2 + torch.logdet(mm)
    return -0.5 * (d * math.log(2 * math.pi) + logdet + quad)


def ppca_closed_form(mean, evals, evecs, m: int = LATENT):
    """Tipping & Bishop (1999) maximum likelihood: mu = mean, sigma^2 = mean of the discarded
    eigenvalues, W = U_M (Lambda_M - sigma^2 I)^(1/2) (up to a rotation)."""
    sigma2 = evals[m:].mean()
    w = evecs[:, :m] * torch.sqrt(evals[:m] - sigma2)
    return w, mean.clone(), torch.log(sigma2)


def ppca_posterior(x, w, mu, log_sigma2):
    """3.4: p(z|x) = N(Mm^-1 W^T (x - mu), sigma^2 Mm^-1). Returns (mean (N, M), covariance)."""
    sigma2 = torch.exp(log_sigma2)
    mm = w.T @ w + sigma2 * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    mean = torch.linalg.solve(mm, ((x - mu) @ w).T).T
    return mean, sigma2 * torch.linalg.inv(mm)


def subspace_angles_deg(a, b):
    """Principal angles between the column spaces of a and b, in degrees."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).tolist()


def ppca_mean_log_likelihood(mean, cov, w, mu, log_sigma2):
    """The average over a data set of log N(x; mu, C), C = W W^T + sigma^2 I, from the data's mean
    and covariance S = (1/N) sum (x - mean)(x - mean)^T alone (they are sufficient statistics):
      -1/2 [D log 2 pi + log|C| + tr(C^-1 S_mu)],  S_mu = S + (mean - mu)(mean - mu)^T,
    with tr(C^-1 S_mu) = (tr S_mu - tr(Mm^-1 W^T S_mu W)) / sigma^2 (Woodbury), so a full-data
    gradient step costs one D x D times D x M product instead of a pass over the images."""
    d, m = w.shape
    sigma2 = torch.exp(log_sigma2)
    mm = w.T @ w + sigma2 * torch.eye(m, dtype=w.dtype, device=w.device)
    diff = mean - mu
    s_mu = cov + torch.outer(diff, diff)
    quad = (torch.trace(s_mu) - torch.trace(torch.linalg.solve(mm, w.T @ (s_mu @ w)))) / sigma2
    return -0.5 * (d * math.log(2 * math.pi) + (d - m) * log_sigma2 + torch.logdet(mm) + quad)


def fit_ppca_gradient(mean, cov, lr, tol, max_iter, seed, progress):
    """The lab's way, to convergence: gradient ascent (Adam) on the exact marginal likelihood of
    all training images, sigma^2 > 0 through log sigma^2, from W ~ N(0, 0.1^2), mu = 0,
    sigma^2 = 1. Stopping rule: every 100 iterations, stop once the mean log-likelihood gained
    less than `tol` nats per image over those 100 iterations (or after max_iter)."""
    gen = torch.Generator().manual_seed(seed)
    w = (0.1 * torch.randn(len(mean), LATENT, generator=gen, dtype=torch.float64)).requires_grad_()
    mu = torch.zeros(len(mean), dtype=torch.float64, requires_grad=True)
    log_sigma2 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, mu, log_sigma2], lr=lr)
    curve, converged = [], False
    for it in range(1, max_iter + 1):
        loss = -ppca_mean_log_likelihood(mean, cov, w, mu, log_sigma2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(-loss.item())
        if not math.isfinite(curve[-1]):
            raise utils.UsageError(f"the PPCA fit diverged at iteration {it}; lower --ppca-lr")
        progress.update(1)
        if it % 100 == 0 and it > 100 and curve[-1] - curve[-101] < tol:
            converged = True
            progress.total = it           # the bar ends full when the rule stops the fit
            progress.refresh()
            break
    init = "W ~ N(0, 0.1^2) entrywise, mu = 0, log sigma^2 = 0 (sigma^2 = 1)"
    rule = (f"stop when 100 full-data Adam iterations (lr {lr:g}) raise the mean log-likelihood "
            f"by less than {tol:g} nats per image (at most {max_iter:,} iterations)")
    return (w.detach(), mu.detach(), log_sigma2.detach()), curve, {
        "initialization": init, "stopping_rule": rule, "converged": converged,
        "iterations": len(curve), "lr": lr}


# ----------------------------------------------------------------------------------------------
# VAE with a 2-D latent (3.5, 4.7 to 4.10)
# ----------------------------------------------------------------------------------------------
class LabVAE(nn.Module):
    """model.py's VAE with d = 2 on [0, 1] pixels: the encoder sees 2x - 1 and the decoder's
    output G(z) in [-1, 1] units is mapped back by (G + 1) / 2, so the course networks are used
    unchanged. p(x|z) = N(f(z), sigma^2 I) with one learned log sigma^2 (the lab's model)."""

    def __init__(self, latent_dim: int = LATENT):
        super().__init__()
        self.vae = vae_model.VAE(latent_dim)
        # Start sigma^2 near the pixel MSE a good 2-D model reaches (a few hundredths): a large
        # initial sigma^2 lets the KL dominate the first epochs and slows learning down.
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(0.02)))

    def encode(self, x):
        # channels_last: about 10 % faster convolutions on CPU
        return self.vae.encoder((2 * x.view(-1, 1, 28, 28) - 1).contiguous(
            memory_format=torch.channels_last))

    def decode(self, z):
        return (self.vae.decoder(z).reshape(-1, D) + 1) / 2

    def elbo_terms(self, x, eps=None):
        """The ELBO's two terms per image, in nats, with one reparameterized sample z ~ q:
        (log N(x; f(z), sigma^2 I), KL(q || N(0, I)) in closed form (3.5))."""
        mu, logvar = self.encode(x)
        z = vae_model.reparameterize(mu, logvar, eps)
        log_lik = vae_model.log_normal_pdf(x, self.decode(z), self.log_sigma2)
        return log_lik, vae_model.kl_std_normal(mu, logvar).sum(1)

    def elbo(self, x, eps=None):
        """Per-image ELBO in nats: log N(x; f(z), sigma^2 I) - KL(q || N(0, I))."""
        log_lik, kl = self.elbo_terms(x, eps)
        return log_lik - kl


# ----------------------------------------------------------------------------------------------
def sq_error_per_image(x, recon) -> torch.Tensor:
    """Each image's squared reconstruction error, summed over its pixels."""
    return (x.double() - recon.double()).pow(2).sum(1)


def sq_error(x, recon, labels) -> dict:
    """The lab's measure: squared error summed over pixels, averaged over images; per digit too,
    with each digit's standard error (its images' standard deviation over sqrt(n)), so that a
    ranking of digits can tell real differences from near-ties."""
    err = sq_error_per_image(x, recon)
    per = {str(d): utils.mean_and_se(err[labels == d]) for d in range(10)}
    return {"test_sq_error": err.mean().item(), "test_sq_error_se": utils.mean_and_se(err)["se"],
            "test_sq_error_per_digit": {d: e["mean"] for d, e in per.items()},
            "test_sq_error_se_per_digit": {d: e["se"] for d, e in per.items()}}


def paired_gain(x, recon_from, recon_to, labels) -> dict:
    """Per digit, how much lower the squared error of `recon_to` is than that of `recon_from` on
    the same images: the mean and standard error of the per-image differences (paired, so
    that what the two methods share about an image cancels)."""
    diff = sq_error_per_image(x, recon_from) - sq_error_per_image(x, recon_to)
    return {str(d): utils.mean_and_se(diff[labels == d]) for d in range(10)}


def nearest_digit(images, reference, reference_labels) -> torch.Tensor:
    """Which digit an image shows, judged by no model of ours: the label of its nearest
    reference image (Euclidean distance; scikit-learn's 1-nearest-neighbour classifier)."""
    knn = KNeighborsClassifier(n_neighbors=1, algorithm="brute")
    knn.fit(reference.float().numpy(), reference_labels.numpy())
    return torch.from_numpy(knn.predict(images.float().numpy())).long()


def kept_digits(named, labels) -> dict:
    """Does a reconstruction still show its digit? Per digit: the share of images named as
    their own digit, and the digit named most often with its share (the digit itself when it
    survives, else what it turned into). And how often the rule names the digit where it is
    not: its false alarms (the share of other digits' images named as it) and its precision
    (the share of images named as it that show it; None if none is), since a rule that names
    most blends 0 keeps most 0s without telling them apart."""
    per = {}
    for d in range(10):
        counts = torch.bincount(named[labels == d], minlength=10).double()
        named_d = named == d
        per[str(d)] = {"images": int(counts.sum()),
                       "kept": (counts[d] / counts.sum()).item(), "named_most": int(counts.argmax()),
                       "named_most_share": (counts.max() / counts.sum()).item(),
                       "false_alarm": named_d[labels != d].double().mean().item(),
                       "precision": ((labels[named_d] == d).double().mean().item()
                                     if named_d.any() else None)}
    return {"kept": (named == labels).double().mean().item(), "per_digit": per}


def binomial_variance(share: float, n: int) -> float:
    """The variance of a share measured on n independent images: share (1 - share) / n."""
    return share * (1 - share) / n


def kept_beyond_false_alarms(results: dict, labels) -> dict:
    """Q4.1's control for the naming rule's bias towards a few digits: each digit's share kept
    minus its false-alarm rate (Youden's J: 0 for a rule that names digits at random, 1 for one
    that is always right), per method, with the best three and the digits tied with them (the
    two shares' binomial standard errors combined; they count different images)."""
    n = torch.bincount(labels, minlength=10)
    answers = {"beyond_false_alarms": {}, "beyond_false_alarms_best": {},
               "beyond_false_alarms_ties": {}}
    for k in ("pca", "ppca_gradient", "vae"):
        per = results[k]["nearest_digit"]["per_digit"]
        score = {d: per[d]["kept"] - per[d]["false_alarm"] for d in DIGITS}
        se = {d: math.sqrt(binomial_variance(per[d]["kept"], int(n[int(d)]))
                           + binomial_variance(per[d]["false_alarm"], len(labels) - int(n[int(d)])))
              for d in DIGITS}
        negated = {d: -v for d, v in score.items()}         # `order` ranks the lowest first
        answers["beyond_false_alarms"][k] = score
        answers["beyond_false_alarms_best"][k] = order(negated)[:3]
        answers["beyond_false_alarms_ties"][k] = boundary_ties(negated, se)["best"]
    return answers


def lost_beyond_blur(results: dict, labels) -> dict:
    """Q4.1's blur control digit by digit. The naming rule keeps blurred digits less often, so a
    digit PCA loses (half or fewer of its images kept) is lost beyond blur only where PCA keeps
    measurably fewer of its images than the same images box-blurred to PCA's error: more than two
    standard errors of the difference apart, the two shares' binomial errors counted as
    independent (cautious: they are the same images). Returns the two lists of digits."""
    n = torch.bincount(labels, minlength=10)
    pca, blur = (results[k]["nearest_digit"]["per_digit"] for k in ("pca", "blurred_test_images"))
    beyond, as_blur = [], []
    for d in range(10):
        a, b = pca[str(d)]["kept"], blur[str(d)]["kept"]
        if a > 0.5:
            continue
        se = math.sqrt(binomial_variance(a, int(n[d])) + binomial_variance(b, int(n[d])))
        (beyond if b - a > 2 * se else as_blur).append(d)
    return {"pca_lost_beyond_blur": beyond, "pca_lost_as_blur": as_blur}


def shrinkage_error(x, mean, evals, evecs, m: int = LATENT) -> float:
    """Q4.6: how much more squared error the closed-form PPCA's decoded posterior mean has than
    PCA, predicted. With W = V_M (Lambda_M - sigma^2 I)^(1/2), decoding the posterior mean gives
    V_M (I - sigma^2 Lambda_M^-1) y for PCA coordinates y = V_M^T (x - mean): each coordinate
    shrunk by sigma^2 / lambda_i, orthogonally to PCA's residual. So the extra error per image
    is sum_i (sigma^2 / lambda_i)^2 y_i^2, averaged here over the images x."""
    sigma2 = evals[m:].mean()
    y = (x.double() - mean) @ evecs[:, :m]
    return ((sigma2 / evals[:m]) ** 2 * y.pow(2)).sum(1).mean().item()


def digit_geometry(z, labels):
    """Mean encoding per digit, the encodings' ranges, spreads and tails (each coordinate's
    excess kurtosis, 0 for a Gaussian), how well the digits separate, and the digit pairs whose
    mean encodings are closest (pairwise Euclidean distance, relative to the mean distance so
    methods with different scales compare)."""
    z = z.double()
    means = torch.stack([z[labels == d].mean(0) for d in range(10)])
    standard = (z - z.mean(0)) / z.std(0, correction=0)
    # Fisher's criterion, tr(S_W^-1 S_B): the covariance of the ten digit means against the
    # average covariance within a digit. No invertible linear map of the codes changes it, so
    # PPCA (a linear map of PCA's codes, Q4.4) scores as PCA does, and the VAE is compared with
    # them on shape, not on the axes' scales.
    within = torch.stack([z[labels == d].T.cov() for d in range(10)]).mean(0)
    between = means.T.cov()
    dist = torch.cdist(means, means)
    pairs = sorted(((dist[i, j].item(), i, j) for i in range(10) for j in range(i + 1, 10)))
    mean_dist = dist[torch.triu_indices(10, 10, 1).unbind()].mean().item()
    return {
        "mean_encoding": {str(d): means[d].tolist() for d in range(10)},
        "range_min": z.min(0).values.tolist(), "range_max": z.max(0).values.tolist(),
        "std": z.std(0).tolist(),
        "excess_kurtosis": (standard.pow(4).mean(0) - 3).tolist(),
        "separation": torch.linalg.solve(within, between).trace().item(),
        "closest_pairs": [{"digits": [i, j], "distance": dd, "relative": dd / mean_dist}
                          for dd, i, j in pairs[:5]],
    }


def code_groups(mean_codes) -> list[list[int]]:
    """The digits whose mean codes crowd together (4.7): single-linkage clustering of the ten
    mean codes (scipy), cut where the distance between successive merges jumps most, so that
    the cut is the data's widest gap, not a threshold of ours. A group of one is a digit that
    lies apart. Largest groups first."""
    tree = scipy.cluster.hierarchy.linkage(np.asarray(mean_codes, dtype=float), "single")
    heights = tree[:, 2]
    k = int(np.argmax(np.diff(heights)))
    labels = scipy.cluster.hierarchy.fcluster(tree, (heights[k] + heights[k + 1]) / 2, "distance")
    groups = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    return sorted(groups, key=lambda g: (-len(g), g))


def boundary_ties(per: dict, se: dict, ends: int = 3) -> dict:
    """The digits outside a ranking's best (or worst) `ends` that it cannot tell from the last
    digit inside: their means differ by less than two standard errors of the difference."""
    ranked = order(per)

    def tied(inside, outside):
        return [d for d in outside if utils.within_two_se(per[d], per[inside], se[d], se[inside])]
    return {"best": tied(ranked[ends - 1], ranked[ends:]), "worst": tied(ranked[-ends], ranked[:-ends])}


def order(per: dict) -> list:
    """Digits from best (lowest value) to worst."""
    return sorted(per, key=per.get)


def lab_answers(results: dict, geometry: dict, ink: dict) -> dict:
    """The rankings and comparisons that questions 4.1 to 4.10 ask for, from the measured errors
    and encodings: best and worst digits per method with their ties and the error's link with
    ink (`ranking_answers`), which digits survive reconstruction (`survival_answers`), the
    closest mean codes and the groups they crowd into (`crowding_answers`), and the VAE's
    gains over PPCA per digit (`gain_answers`)."""
    ranking = ranking_answers(results, ink)
    survival = survival_answers(results, ranking["best"]["pca"], ranking["worst"]["pca"])
    return {**ranking, **survival,
            **crowding_answers(results, geometry, survival["lost"]["pca"], ink),
            **gain_answers(results)}


def ranking_answers(results: dict, ink: dict) -> dict:
    """Best and worst digits by squared error per method and the digits tied with them; the
    error's correlation with ink (the error is a sum over pixels) and the ranking relative to
    ink; the digits both measures put at one end."""
    methods = ("pca", "ppca_gradient", "vae")
    errors = {k: results[k]["test_sq_error_per_digit"] for k in methods}
    se = {k: results[k]["test_sq_error_se_per_digit"] for k in methods}
    rank = {k: order(v) for k, v in errors.items()}
    pca = errors["pca"]
    # the error relative to ink, per method: the standard error scales with it (ink is the
    # same images' mean), so the ties are the error's
    per_ink = {k: {d: errors[k][d] / ink[d] for d in DIGITS} for k in methods}
    relative_rank = {k: order(v) for k, v in per_ink.items()}
    relative = relative_rank["pca"]
    best, worst = rank["pca"][:3], rank["pca"][-3:][::-1]

    def both(ends, relative_ends):       # the digits both error measures put at one end
        return sorted(set(ends) & set(relative_ends), key=ends.index)
    return {
        "best": {k: v[:3] for k, v in rank.items()},
        "worst": {k: v[-3:][::-1] for k, v in rank.items()},
        "ppca_same_as_pca": set(rank["ppca_gradient"][:3]) == set(best)
                            and set(rank["ppca_gradient"][-3:]) == set(worst),
        "pca_ink_correlation": float(np.corrcoef([ink[d] for d in DIGITS],
                                                 [pca[d] for d in DIGITS])[0, 1]),
        # its two-sided p-value over ten digits (scipy's Pearson test)
        "pca_ink_correlation_p": float(scipy.stats.pearsonr([ink[d] for d in DIGITS],
                                                            [pca[d] for d in DIGITS]).pvalue),
        "pca_relative_best": relative[:3], "pca_relative_worst": relative[-3:][::-1],
        "relative_best": {k: v[:3] for k, v in relative_rank.items()},
        "relative_worst": {k: v[-3:][::-1] for k, v in relative_rank.items()},
        # the digits the ranking relative to ink cannot tell from its ends
        "relative_ties": {k: boundary_ties(per_ink[k], {d: se[k][d] / ink[d] for d in DIGITS})
                          for k in methods},
        "pca_best_by_both": both(best, relative[:3]),
        "pca_worst_by_both": both(worst, relative[-3:][::-1]),
        "ties": {k: boundary_ties(errors[k], se[k]) for k in methods},
        "ppca_error_not_below_pca": results["ppca_gradient"]["test_sq_error"]
                                    >= results["pca"]["test_sq_error"],
    }


def survival_answers(results: dict, best: list, worst: list) -> dict:
    """Which digits each method keeps (most of their reconstructions nearest to a training image
    of the same digit) and what the lost ones are read as; where the two measures of 4.1
    disagree (PCA's `best` and `worst` digits by squared error); and whether the naming rule
    still keeps every digit of blurred test images."""
    named = {k: results[k]["nearest_digit"]["per_digit"] for k in ("pca", "ppca_gradient", "vae")}
    # a digit is lost when fewer than half of its reconstructions are named as itself
    lost = {k: {d: v[d]["named_most"] for d in DIGITS if v[d]["kept"] < 0.5} for k, v in named.items()}
    return {
        "kept_order": {k: sorted(DIGITS, key=lambda d, v=v: -v[d]["kept"]) for k, v in named.items()},
        "lost": lost,
        # the two measures of 4.1 disagree on a digit with a small error that is lost, or a
        # large one that survives
        "pca_best_error_but_lost": [d for d in best if d in lost["pca"]],
        "pca_worst_error_but_kept": [d for d in worst if d not in lost["pca"]],
        "ppca_loses_the_same_as_pca": set(lost["ppca_gradient"]) == set(lost["pca"]),
        # the naming rule's bias on blurs: does it still keep every digit of blurred test images?
        "namer_keeps_blurred_digits": all(v["kept"] >= 0.5 for v in
                                          results["blurred_test_images"]["nearest_digit"]["per_digit"].values()),
    }


def crowding_answers(results: dict, geometry: dict, pca_lost: dict, ink: dict) -> dict:
    """4.7: the closest mean codes (shared by PCA and PPCA?), crowding (distance to the nearest
    other digit's mean code) against PCA's error relative to ink (the squared error favours
    digits with little ink, 4.1), the groups the codes crowd into and whether the digits apart
    survive more often, and whether a lost digit turns into its nearest neighbour's digit."""
    pca = {d: results["pca"]["test_sq_error_per_digit"][d] / ink[d] for d in DIGITS}
    crowding = {}
    for name, g in geometry.items():
        means = torch.tensor([g["mean_encoding"][d] for d in DIGITS], dtype=torch.float64)
        dist = torch.cdist(means, means).fill_diagonal_(float("inf"))
        crowding[name] = {d: dist[int(d)].min().item() for d in DIGITS}
        if name == "pca":           # digit j's rank among the other nine by closeness to i's code
            neighbour_rank = {(i, int(j)): r for i in range(10)
                              for r, j in enumerate(dist[i].argsort()[:9].tolist(), 1)}
    crowd_rho, crowd_p = (float(v) for v in scipy.stats.spearmanr(
        [crowding["pca"][d] for d in DIGITS], [pca[d] for d in DIGITS]))
    closest = {k: {tuple(p["digits"]) for p in geometry[k]["closest_pairs"][:3]} for k in geometry}
    # Does a lost digit turn into the digit whose mean code is nearest to its own? By chance
    # (what it turns into unrelated to the codes) one in nine would: a one-sided binomial test.
    # (a lost digit still named most often as itself, by a plurality under half, turns into no
    # one digit and is left out)
    lost_rank = {d: neighbour_rank[(int(d), int(v))] for d, v in pca_lost.items() if int(d) != int(v)}
    to_nearest = sum(r == 1 for r in lost_rank.values())
    to_nearest_p = (scipy.stats.binomtest(to_nearest, len(lost_rank), 1 / 9, alternative="greater").pvalue
                    if lost_rank else 1.0)
    # Do the digits whose codes lie apart survive PCA more often than the crowded ones? Fisher's
    # exact test on the 2 x 2 table (apart or crowded, kept or lost), one-sided.
    groups = {k: code_groups([geometry[k]["mean_encoding"][d] for d in DIGITS]) for k in geometry}
    apart = [str(g[0]) for g in groups["pca"] if len(g) == 1]
    crowded = [str(d) for g in groups["pca"] if len(g) > 1 for d in g]
    apart_kept = sum(d not in pca_lost for d in apart)
    crowded_kept = sum(d not in pca_lost for d in crowded)
    apart_p = scipy.stats.fisher_exact([[apart_kept, len(apart) - apart_kept],
                                        [crowded_kept, len(crowded) - crowded_kept]],
                                       alternative="greater").pvalue
    return {
        "closest_pairs_shared_pca_ppca": len(closest["pca"] & closest["ppca"]),
        # Crowding ranks the errors only if the two orders agree beyond chance over the ten
        # digits: a negative Spearman correlation with p < 0.05 (|rho| > 0.65 for n = 10).
        "pca_crowding_spearman": crowd_rho,
        "pca_crowding_p": crowd_p,
        "pca_crowded_are_worst": crowd_rho < 0 and crowd_p < 0.05,
        "code_groups": groups,
        "pca_apart_kept": apart_kept, "pca_crowded_kept": crowded_kept,
        "pca_apart_kept_p": float(apart_p),
        "pca_apart_kept_more": bool(apart_p < 0.05),
        "pca_lost_neighbour_rank": lost_rank,
        "pca_lost_to_nearest": to_nearest,
        "pca_lost_to_nearest_p": float(to_nearest_p),
        "pca_lost_follow_codes": bool(to_nearest_p < 0.05),
    }


def gain_answers(results: dict) -> dict:
    """4.9: the VAE's gain over PPCA per digit (a paired mean with its standard error), the
    digits it improves, the largest and smallest gains and the digits tied with them."""
    gain = results["vae"]["gain_over_ppca"]
    gains, gains_se = {d: g["mean"] for d, g in gain.items()}, {d: g["se"] for d, g in gain.items()}
    return {
        "vae_gains_over_ppca": gains,
        "vae_gains_over_ppca_se": gains_se,
        "vae_improved_digits": sum(g > 0 for g in gains.values()),
        "vae_largest_gains": sorted(gains, key=gains.get, reverse=True)[:3],
        "vae_smallest_gains": sorted(gains, key=gains.get)[:3],
        "vae_gain_ties": boundary_ties(gains, gains_se),
    }


def method_verdicts(results: dict, comparison: dict, geometry: dict) -> dict:
    """How the methods compare (4.3, 4.4, 4.8 to 4.10): does the gradient fit reach the closed
    form (test log-likelihoods within 0.01 nats per image, subspaces within one degree); how
    much less PPCA's posterior mean shrinks its second axis than its first (Q4.4: axis i by
    sqrt(lambda_i - sigma^2) / lambda_i); do the VAE's codes separate the digits better and
    sit on the prior's scale (each coordinate's standard deviation between 0.5 and 2); the
    VAE's error relative to PPCA's; and is its test ELBO above PPCA's test log-likelihood."""
    grad, closed, vae = results["ppca_gradient"], results["ppca_closed_form"], results["vae"]
    lam, sigma2 = closed["data_eigenvalues"], closed["sigma2"]
    lead_terms = elbo_lead_terms(closed, vae)
    shrink = [math.sqrt(max(v - sigma2, 0.0)) / v for v in lam]
    return {"gradient_reaches_closed_form": bool(
                abs(grad["test_log_likelihood"] - closed["test_log_likelihood"]) < 0.01
                and max(comparison["subspace_angles_deg"]) < 1),
            "ppca_second_axis_shrink_ratio": shrink[1] / shrink[0],
            "vae_separates_better": geometry["vae"]["separation"] > geometry["ppca"]["separation"],
            # ...and yet its closest pair of digit means may be closer, relative to the mean
            # distance between digit means (scale-free), than PPCA's closest pair
            "vae_closest_pair_closer": (geometry["vae"]["closest_pairs"][0]["relative"]
                                        < geometry["ppca"]["closest_pairs"][0]["relative"]),
            "vae_on_prior_scale": all(0.5 <= sd <= 2 for sd in geometry["vae"]["std"]),
            # ...yet heavier-tailed than N(0, I) if a coordinate's excess kurtosis passes 1 (its
            # standard error for 10,000 Gaussian draws is sqrt(24 / 10,000) = 0.05)
            "vae_heavy_tails": max(geometry["vae"]["excess_kurtosis"]) > 1,
            "vae_below_ppca": vae["test_sq_error"] < grad["test_sq_error"],
            # the ELBO is a lower bound on the VAE's log-likelihood: above PPCA's exact one,
            # the VAE is the better density model of the test images too (Q4.10)
            "vae_better_density": vae["test_elbo"] > closed["test_log_likelihood"],
            # ...but a Gaussian density's normalizer alone moves by D/2 log(sigma2 ratio): how
            # much of that gap the two noise variances explain, whatever the decoders do
            "noise_variance_nats": lead_terms["noise_variance"],
            "elbo_lead_terms": lead_terms,
            "vae_error_relative_to_ppca": vae["test_sq_error"] / grad["test_sq_error"] - 1}


def elbo_lead_terms(closed: dict, vae: dict) -> dict:
    """Q4.10: the VAE's test ELBO minus PPCA's exact test log-likelihood, split exactly into
    four terms (nats per image) that sum to it. Both are Gaussian log-densities,
    -D/2 log(2 pi sigma^2) - (misfit) - (extra), where PPCA's covariance C has eigenvalues
    lambda_1, lambda_2 along its principal directions and sigma^2 elsewhere, so
    log|C| = D log sigma^2 + sum_i log(lambda_i / sigma^2), and its misfit is
    (x - mu)^T C^-1 (x - mu) / 2; the VAE's misfit is ||x - f(z)||^2 / (2 sigma^2) at its sampled
    z, and its extra term is the KL."""
    sigma2_ppca, sigma2_vae = closed["sigma2"], vae["sigma2"]
    wider = 0.5 * sum(math.log(v / sigma2_ppca) for v in closed["data_eigenvalues"])
    ppca_misfit = (-closed["test_log_likelihood"] - D / 2 * math.log(2 * math.pi * sigma2_ppca)
                   - wider)
    vae_misfit = -vae["test_expected_log_likelihood"] - D / 2 * math.log(2 * math.pi * sigma2_vae)
    return {"noise_variance": D / 2 * math.log(sigma2_ppca / sigma2_vae),
            "ppca_principal_directions": wider,     # PPCA's wider two directions cost it this
            "misfit": ppca_misfit - vae_misfit,     # each near D/2 at a maximum-likelihood sigma^2
            "kl": -vae["test_kl"],
            "ppca_misfit": ppca_misfit, "vae_misfit": vae_misfit}


def mid_grey_share(images) -> float:
    """The share of pixels (images in [0, 1]) that are neither background nor stroke: a
    measure of blur that needs no classifier (HUJI Q3 uses the same band on its [-1, 1] scale)."""
    return ((images > GREY_BAND) & (images < 1 - GREY_BAND)).double().mean().item()


def prior_sample_blur(w, mu, lab_vae, test_x, seed: int, device) -> dict:
    """Q4.10: mid-grey shares of PRIOR_SAMPLES prior draws through PPCA's and the VAE's
    decoders (the same z for both), and of the test images for reference."""
    z = torch.randn(PRIOR_SAMPLES, LATENT, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ppca = (z.double() @ w.T + mu).clamp(0, 1)
        vae = lab_vae.decode(z.to(device)).cpu()
    return {"ppca": mid_grey_share(ppca), "vae": mid_grey_share(vae),
            "test_images": mid_grey_share(test_x), "samples": PRIOR_SAMPLES, "band": GREY_BAND}


def parse_args(argv=None):
    parser = utils.script_parser("ppca_pca", __doc__.splitlines()[0])
    parser.add_argument("--ppca-lr", type=utils.float_in(1e-6, 1.0), default=0.01,
                        help="Adam learning rate of the full-data PPCA gradient fit")
    parser.add_argument("--ppca-tol", type=utils.float_in(0.0, 1.0), default=1e-7,
                        help="stop the PPCA fit when 100 iterations gain less than this "
                             "(nats per image)")
    parser.add_argument("--ppca-max-iter", type=utils.int_in(100, 1_000_000), default=20_000,
                        help="at most this many PPCA iterations")
    parser.add_quick_argument("--train-images", 60_000, 2_000, "training images (the first ones)",
                              type=utils.int_in(100, 60_000))
    parser.add_quick_argument("--test-images", 10_000, 500, "test images (the first ones)",
                              type=utils.int_in(utils.TEST_IMAGES_EVERY_DIGIT_TWICE, 10_000))
    # 15: the training ELBO then rises by about 2 nats per image in the last epoch (11 after 5)
    parser.add_quick_argument("--epochs", 15, 1, "VAE epochs", type=utils.int_in(1, 10_000))
    parser.add_argument("--batch-size", type=utils.int_in(1, 8192), default=128,
                        help="VAE batch")
    parser.add_argument("--lr", type=utils.float_in(1e-8, 10), default=5e-3,
                        help="VAE peak Adam lr (one-cycle schedule)")
    return parser.parse_args(argv)


def pca_answers(train_x, test_x, test_y):
    """PCA with two components (4.1, 4.2): fitted to the training images, the test images
    encoded and decoded. Returns (result, codes, reconstructions, (mean, eigenvalues,
    eigenvectors) of the training covariance, which PPCA reuses)."""
    mean, evals, evecs = covariance_eigen(train_x)
    v = evecs[:, :LATENT]
    z = pca_encode(test_x, mean, v)
    recon = pca_decode(z, mean, v)
    return ({**sq_error(test_x, recon, test_y),
             "explained_variance": (evals[:LATENT].sum() / evals.sum()).item()},
            z, recon, (mean, evals, evecs))


def ppca_answers(train_x, test_x, test_y, eigen, fit_args):
    """PPCA (4.3 to 4.6) fitted twice, by the lab's gradient ascent to convergence and in
    closed form; each evaluated on the test images through its posterior mean. Returns
    ({ppca_gradient, ppca_closed_form}: result, their comparison, the gradient fit's codes and
    reconstructions, both parameter sets, the fit's log-likelihood curve)."""
    mean, evals, evecs = eigen
    x64, t64 = train_x.double(), test_x.double()
    cov = (evecs * evals) @ evecs.T                     # the training covariance S, again
    bar = tqdm(total=fit_args["max_iter"], desc="PPCA (Adam, full data)", unit="iter")
    grad_params, curve, fit_info = fit_ppca_gradient(mean, cov, progress=bar, **fit_args)
    bar.close()
    params = {"ppca_gradient": grad_params, "ppca_closed_form": ppca_closed_form(mean, evals, evecs)}
    results, posterior = {}, {}
    for name, (w, mu, log_sigma2) in params.items():
        z_post, cov_post = ppca_posterior(t64, w, mu, log_sigma2)
        posterior[name] = (z_post, z_post @ w.T + mu)        # codes, decoded posterior means
        results[name] = {
            **sq_error(test_x, posterior[name][1], test_y),
            "test_log_likelihood": ppca_log_likelihood(t64, w, mu, log_sigma2).mean().item(),
            "train_log_likelihood": ppca_log_likelihood(x64, w, mu, log_sigma2).mean().item(),
            "sigma2": log_sigma2.exp().item(),
            "posterior_std": cov_post.diagonal().sqrt().tolist(),
            # W^T W's eigenvalues: the model's variance along its two directions, minus sigma^2
            "w_eigenvalues": torch.linalg.eigvalsh(w.T @ w).flip(0).tolist(),
        }
    results["ppca_gradient"].update(fit_info)
    results["ppca_closed_form"]["data_eigenvalues"] = evals[:LATENT].tolist()
    grad, closed = results["ppca_gradient"], results["ppca_closed_form"]
    comparison = {"subspace_angles_deg": subspace_angles_deg(grad_params[0],
                                                              params["ppca_closed_form"][0]),
                  "test_ll_gap_closed_minus_gradient": closed["test_log_likelihood"]
                                                       - grad["test_log_likelihood"],
                  "sigma2_relative_error": grad["sigma2"] / closed["sigma2"] - 1,
                  "w_eigenvalue_relative_errors": [
                      g / c - 1 for g, c in zip(grad["w_eigenvalues"], closed["w_eigenvalues"])],
                  "closed_form_shrinkage_error": shrinkage_error(t64, mean, evals, evecs)}
    return results, comparison, posterior["ppca_gradient"], params, curve, cov


def train_lab_vae(training, lab_vae, optimizer, scheduler, x, batch_size):
    """The lab VAE's epochs (4.7): minibatch Adam on the negative ELBO, one-cycle schedule."""
    for epoch in training:
        lab_vae.train()
        total = 0.0
        for idx in utils.batches(len(x), batch_size, shuffle=True, device=x.device):
            elbo = lab_vae.elbo(x[idx])
            optimizer.zero_grad(set_to_none=True)
            (-elbo.mean()).backward()
            optimizer.step()
            scheduler.step()
            total += elbo.sum().item()
            training.progress.update(1)
        training.log(train_elbo=total / len(x))


@torch.no_grad()
def vae_answers(lab_vae, test_x, test_y, device):
    """The lab VAE on the test images: its ELBO, codes (means of q) and reconstructions
    (decoded codes). Returns (result, codes, reconstructions)."""
    lab_vae.eval()
    td = test_x.to(device)
    log_lik, kl = (torch.cat(t) for t in zip(*[lab_vae.elbo_terms(b) for b in td.split(2000)]))
    z = torch.cat([lab_vae.encode(b)[0] for b in td.split(2000)]).cpu()
    recon = torch.cat([lab_vae.decode(b.to(device)) for b in z.split(2000)]).cpu()
    elbo = utils.mean_and_se(log_lik - kl)        # one z per image: its SE covers that draw too
    return ({**sq_error(test_x, recon, test_y), "test_elbo": elbo["mean"], "test_elbo_se": elbo["se"],
             "test_expected_log_likelihood": log_lik.mean().item(), "test_kl": kl.mean().item(),
             "sigma2": lab_vae.log_sigma2.exp().item()}, z, recon)


def box_blur(x, size: int):
    """Images (n, 784) averaged over a size x size box around each pixel (the box cut at the
    border)."""
    return torch.nn.functional.avg_pool2d(x.view(-1, 1, 28, 28), size, stride=1, padding=size // 2,
                                          count_include_pad=False).view(len(x), -1)


def blur_like(x, target_errors):
    """Each image of x box-blurred by the box of BLUR_BOXES whose squared error from it (summed
    over pixels) is nearest its own entry of `target_errors`: given PCA's error for each image,
    test images blurred to PCA's squared error, image by image, so that each digit's blurred
    copies also have about PCA's error for that digit. The control for the naming rule's bias
    on blur. Returns (blurred images, the box size chosen for each image, the smaller box on a
    tie; and whether any box reaches the image's target error: where none does, the blur stays
    short of it)."""
    target_errors = target_errors.double()
    nearest = torch.full_like(target_errors, math.inf)
    blurred, boxes = torch.empty_like(x), torch.zeros(len(x), dtype=torch.long)
    reached = torch.zeros(len(x), dtype=torch.bool)
    for size in BLUR_BOXES:
        candidate = box_blur(x, size)
        error = sq_error_per_image(x, candidate)
        gap = (error - target_errors).abs()
        closer = gap < nearest
        nearest[closer], blurred[closer], boxes[closer] = gap[closer], candidate[closer], size
        reached |= error >= target_errors
    return blurred, boxes, reached


@torch.no_grad()
def mean_code_images(geometry: dict, eigen, ppca_w_mu, lab_vae, device) -> dict:
    """Each digit's mean code (Figure 3's crosses, `digit_geometry`'s mean encodings) through
    its method's decoder: {"pca" | "ppca" | "vae": (10, D) images, digit 0 first}."""
    mean, _, evecs = eigen
    w, mu = ppca_w_mu
    decode = {"pca": lambda z: pca_decode(z, mean, evecs[:, :LATENT]),
              "ppca": lambda z: z @ w.T + mu,
              "vae": lambda z: lab_vae.decode(z.float().to(device)).cpu()}
    return {name: decode[name](torch.tensor([g["mean_encoding"][d] for d in DIGITS],
                                            dtype=torch.float64))
            for name, g in geometry.items()}


def pairs_decoded_as_one(geometry: dict, decoded: dict) -> dict:
    """4.7 against 4.1 and 4.5: of PCA's and PPCA's three closest pairs of mean codes
    (`digit_geometry`), those whose two mean codes decode to one and the same digit
    (`decoded_mean_codes`), and for comparison how many of all 45 pairs of digits do so.
    Returns {"pairs_decoded_as_one": {method: [[a, b, the digit both decode to], ...]},
    "pairs_decoded_as_one_of_all": {method: count}}."""
    merged, of_all = {}, {}
    for name in ("pca", "ppca"):
        named = decoded[name]["named"]
        merged[name] = [[a, b, named[a]] for a, b in
                        (pair["digits"] for pair in geometry[name]["closest_pairs"][:3])
                        if named[a] == named[b]]
        of_all[name] = sum(named[a] == named[b] for a, b in itertools.combinations(range(10), 2))
    return {"pairs_decoded_as_one": merged, "pairs_decoded_as_one_of_all": of_all}


def decoded_mean_codes(images: dict, reference, reference_labels) -> dict:
    """4.1, 4.5 and 4.9 ask which digits are reconstructed *and decoded* well: each method's
    decoded mean codes (`mean_code_images`) named by Q4.1's rule, their nearest reference
    training image. Returns {method: {"named": the digit each decodes to, digit 0 first, "own":
    the digits whose mean code decodes to themselves}}."""
    named = {}
    for name, x in images.items():
        digits = nearest_digit(x, reference, reference_labels).tolist()
        named[name] = {"named": digits, "own": [d for d in range(10) if digits[d] == d]}
    return named


def naming_margin(images, reference, reference_labels, chunk: int = 1024) -> torch.Tensor:
    """How clearly `nearest_digit` names each image: the distance to the nearest reference
    image of any other digit over the distance to the nearest one (of the named digit); 1 is a
    tie, and the larger, the clearer."""
    ref, ref_labels = reference.float().flatten(1), torch.as_tensor(reference_labels)
    of_digit = [ref_labels == d for d in range(10)]
    margins = []
    for start in range(0, len(images), chunk):
        dist = torch.cdist(images[start:start + chunk].float().flatten(1), ref)
        per_digit = torch.stack([dist[:, mask].min(1).values if mask.any()   # a digit missing
                                 else torch.full((len(dist),), float("inf"))  # from the reference
                                 for mask in of_digit], 1)                    # is never nearest
        two = per_digit.topk(2, dim=1, largest=False).values
        margins.append(two[:, 1] / two[:, 0].clamp_min(1e-12))
    return torch.cat(margins)


def typical_outcome_per_digit(named: list, test_y, per_digit: list, margin) -> torch.Tensor:
    """Figure 1's images: for each digit 0..9, one test image among those whose reconstruction
    each method names as most of that digit's are named (`kept_digits`' per_digit
    "named_most"), so that the figure shows each method's typical outcome (a random image
    often showed another; graders read it against Table 2). Among those, the clearest case:
    the image whose least clearly named reconstruction (`margin(method index, image indices)`,
    `naming_margin`) is named most clearly, since a reconstruction named by a hair can look
    like another digit than its name. `named` and `per_digit` list the methods in order of
    priority: where no image of a digit is typical for all of them, the last ones are dropped;
    the first (PCA) always holds, since its most frequent name is some image's name."""
    test_y = torch.as_tensor(test_y)
    typical = [n == torch.tensor([p[str(d)]["named_most"] for d in range(10)])[test_y]
               for n, p in zip(named, per_digit)]
    typical_for_first = torch.stack(typical).cumprod(0).bool()    # [k]: for methods 0..k at once
    picks = []
    for digit in range(10):
        of_digit = test_y == digit
        for k in reversed(range(len(named))):                      # all methods first
            candidates = torch.nonzero(of_digit & typical_for_first[k]).flatten()
            if len(candidates):
                clearest = torch.stack([margin(m, candidates) for m in range(k + 1)]).min(0).values
                picks.append(candidates[int(clearest.argmax())])
                break
    return torch.stack(picks)


def reconstruction_answers(recons: dict, test_x, test_y, reference,
                           reference_labels) -> tuple[dict, torch.Tensor]:
    """Does each method's reconstruction still show its digit (4.1, 4.5, 4.7, 4.9)? Each test
    image and each reconstruction is named by its nearest reference training image; the test
    images themselves give that namer's own accuracy, and the same images box-blurred to the
    same squared error as PCA's reconstructions, image by image (`blur_like`), its
    bias on blurs (a blurred reconstruction may be named for its blur, not its digit). Also the
    one image per digit that Figure 1 shows (`typical_outcome_per_digit`) with its names, and
    the VAE's paired gain over PPCA. Returns ({method,
    "original_images" or "blurred_test_images": {"nearest_digit": ..., "shown_named": ...}, with
    "gain_over_ppca" for the VAE, and for the blur how often each box size was chosen and its
    squared errors (`sq_error`)}, the shown images' indices)."""
    blurred, boxes, reached = blur_like(test_x, sq_error_per_image(test_x, recons["pca"]))
    images = {"original_images": test_x, "blurred_test_images": blurred, **recons}
    named = {name: nearest_digit(x, reference, reference_labels)
             for name, x in tqdm(images.items(), desc="naming reconstructions (1-NN)", unit="set")}
    nearest = {name: kept_digits(n, test_y) for name, n in named.items()}
    methods = ("pca", "vae", "ppca_gradient")          # PCA's outcome first, then the VAE's
    show = typical_outcome_per_digit(
        [named[m] for m in methods], test_y, [nearest[m]["per_digit"] for m in methods],
        lambda m, i: naming_margin(images[methods[m]][i], reference, reference_labels))
    answers = {name: {"nearest_digit": nearest[name], "shown_named": named[name][show].tolist()}
               for name in named}
    answers["original_images"]["reference_images"] = len(reference)
    answers["blurred_test_images"].update(
        box_counts={str(size): int((boxes == size).sum()) for size in BLUR_BOXES},
        beyond_every_box=int((~reached).sum()),     # PCA's error above every box's
        **sq_error(test_x, blurred, test_y))
    answers["vae"]["gain_over_ppca"] = paired_gain(test_x, recons["ppca_gradient"], recons["vae"], test_y)
    return answers, show


def plot_figures(out, encodings, test_y, recon_rows, results, ink, ppca, lab_vae, seed, device):
    """Every figure of the lab: the codes (4.2, 4.4, 4.7), reconstructions and decoded mean codes
    (recon_rows: row label -> (images, the digit each is named as, or None)), errors per digit
    relative to ink, the PPCA fit's convergence, the decoded lattices (4.9) and prior samples
    (4.10)."""
    plot_encodings(out / "encodings.png", encodings, test_y)
    # over each decoded image, "read as" the digit its nearest training image shows (4.1's
    # rule); over the originals, their digits
    titles = [list(range(10)) if named is None else [f"→{d}" for d in named]
              for _, named in recon_rows.values()]
    utils.plot_image_rows(out / "reconstructions.png", [x for x, _ in recon_rows.values()],
                          list(recon_rows.keys()), cell_titles=titles, value_range=(0, 1))
    plot_error_bars(out / "sq_error_per_digit.png", results, ink)
    (w, mu, _), closed_params, curve, mean, cov = ppca
    iters = list(range(1, len(curve) + 1))
    closed = ppca_mean_log_likelihood(mean, cov, *closed_params).item()
    gap = [max(closed - ll, 1e-12) for ll in curve]     # >= 0 up to rounding: closed is the max
    # one panel, on a log scale: on a linear one the last 1,000 nats hide the last nat
    utils.plot_curves(out / "ppca_log_likelihood.png", {
        "gap [nats]": {"gradient fit (all training images)": (iters, gap)}},
        xlabel="iteration", log_panels=("gap [nats]",),
        width=utils.HALF_WIDTH, height=1.3)
    lattice = torch.tensor(np.stack(np.meshgrid(np.linspace(2, -2, LATTICE), np.linspace(-2, 2, LATTICE),
                                                indexing="ij")[::-1], -1).reshape(-1, 2))
    with torch.no_grad():
        plot_lattices(out / "lattices.png", {
            "PPCA": (lattice @ w.T + mu).clamp(0, 1),
            "VAE": lab_vae.decode(lattice.float().to(device)).cpu()})
        z_prior = torch.randn(20, LATENT, generator=torch.Generator().manual_seed(seed))
        samples = [(z_prior.double() @ w.T + mu).clamp(0, 1), lab_vae.decode(z_prior.to(device)).cpu()]
    utils.plot_image_rows(out / "samples.png", [s[:10] for s in samples] + [s[10:] for s in samples],
                          ["PPCA", "VAE", "PPCA", "VAE"], value_range=(0, 1),
                          width=0.6 * utils.PAGE_WIDTH)     # the lab report shows it at 60 %


def label_positions(marks, points, box, radius: float) -> np.ndarray:
    """Where to put a round label of `radius` for each of `marks` (n, 2), all in display units:
    the free spot nearest to its mark, free meaning that no `points` (data and marks) lie under
    it or within half a radius of its rim (so that it does not seem to sit on the data) and no
    other label touches it, inside `box` ((x0, y0), (x1, y1)). Greedy over a grid
    of candidate centres a quarter of a radius apart; the caller draws a leader line. Then two
    labels swap spots wherever that shortens their two lines: at the end no two lines cross
    (crossing lines are always longer together than the swapped pair)."""
    (x0, y0), (x1, y1) = box
    gx, gy = np.meshgrid(np.arange(x0 + radius, x1 - radius, radius / 4),
                         np.arange(y0 + radius, y1 - radius, radius / 4))
    candidates = np.column_stack([gx.ravel(), gy.ravel()])
    clear = scipy.spatial.cKDTree(points).query(candidates)[0] >= 1.5 * radius
    placed = np.empty_like(marks, dtype=float)
    for i, mark in enumerate(marks):
        free = clear.nonzero()[0]
        if len(free) == 0:
            raise ValueError("no free place for a label: enlarge the axes")
        best = free[np.argmin(np.hypot(*(candidates[free] - mark).T))]
        placed[i] = candidates[best]
        clear &= np.hypot(*(candidates - placed[i]).T) >= 2.2 * radius
    swapped = True
    while swapped:                  # each swap shortens the total: it ends
        swapped = False
        for i, j in itertools.combinations(range(len(marks)), 2):
            now = np.hypot(*(placed[i] - marks[i])) + np.hypot(*(placed[j] - marks[j]))
            if np.hypot(*(placed[j] - marks[i])) + np.hypot(*(placed[i] - marks[j])) < now - 1e-9:
                placed[[i, j]] = placed[[j, i]]
                swapped = True
    return placed


def plot_encodings(path, encodings, labels):
    plt = utils.pyplot()
    labels = labels.numpy()
    encodings = {name: z.double().numpy() for name, z in encodings.items()}
    means = {name: np.stack([z[labels == d].mean(0) for d in range(10)])
             for name, z in encodings.items()}

    # Top row: each method's codes. Bottom row: the same method's ten mean codes alone,
    # magnified from the dashed box above them: several lie within a fraction of the codes'
    # spread (Q4.7 asks which), too close to label among the codes.
    fig, axes = plt.subplots(2, len(encodings), figsize=(utils.PAGE_WIDTH, 4.3),
                             height_ratios=[1, 0.62], squeeze=False)
    # A random subset, in random order (no digit drawn over all others): all 10,000 points hide
    # one another where digits overlap. Each digit's ellipse (one standard deviation of all its
    # codes) shows its spread under the dots.
    order = np.random.default_rng(0).permutation(len(labels))[:SCATTER_POINTS]
    colours = plt.get_cmap("tab10")
    turn = np.linspace(0, 2 * np.pi, 91)
    circle = np.stack([np.cos(turn), np.sin(turn)])      # mapped onto each digit's ellipse
    for (ax, zoom), (name, z) in zip(axes.T, encodings.items()):
        sc = ax.scatter(z[order, 0], z[order, 1], c=labels[order], cmap="tab10", s=1.5,
                        alpha=0.7, vmin=-0.5, vmax=9.5, rasterized=True, lw=0)
        for d in range(10):
            evals, evecs = np.linalg.eigh(np.cov(z[labels == d].T))
            outline = means[name][d][:, None] + (evecs * np.sqrt(evals.clip(min=0))) @ circle  # rounding: -1e-17
            ax.plot(*outline, lw=0.8, color=colours(d))
        ax.scatter(*means[name].T, marker="x", s=12, c="black", lw=0.8, zorder=3)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")   # shapes comparable by eye (Q4.4)
        low, high = means[name].min(0), means[name].max(0)
        pad = 0.22 * (high - low).max()    # room for the labels around the crosses
        box = np.array([low - pad, high + pad])
        ax.update_datalim(box)              # the box (drawn below) stays in view
        zoom.scatter(*means[name].T, marker="x", s=16, c=[colours(d) for d in range(10)],
                     lw=1.2, zorder=3)
        zoom.update_datalim(box)            # the box, widened to the panel's shape
        zoom.margins(0)
        zoom.set_aspect("equal", adjustable="datalim")
        zoom.set_title(f"{name}: mean codes", fontsize="medium")
        for a in (ax, zoom):
            a.set_xlabel("$z_1$")
            a.set_ylabel("$z_2$")
    fig.colorbar(sc, ax=axes, ticks=range(10), label="digit", fraction=0.02, pad=0.01)
    # Each mean code's digit in a round label where no other cross is, joined to it by a
    # line: the pairs whose means nearly coincide (4 and 9, 5 and 8) are the ones Q4.7
    # discusses. Lay out first, then freeze the layout.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    radius = 7.0 * fig.dpi / 72           # an 8 pt digit in a round badge, in display pixels
    for ax, zoom, marks in zip(axes[0], axes[1], means.values()):
        (x0, x1), (y0, y1) = zoom.get_xlim(), zoom.get_ylim()     # what the panel below shows
        ax.add_artist(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.6, ls="--",
                                    color="black", zorder=3))      # (add_patch would rescale)
        to_px, bbox = zoom.transData, zoom.get_window_extent()
        spots = label_positions(to_px.transform(marks), to_px.transform(marks),
                                bbox.get_points(), radius)
        for d, spot in enumerate(to_px.inverted().transform(spots)):
            zoom.annotate(str(d), marks[d], xytext=spot, fontsize=8, weight="bold", ha="center",
                          va="center", zorder=4, bbox={"boxstyle": "circle,pad=0.12", "fc": "white",
                                                       "ec": colours(d)},
                          arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "black",
                                      "shrinkA": 0, "shrinkB": 2})
    utils.save_figure(fig, path)


def plot_lattices(path, decoded: dict) -> None:
    """Each method's decoded lattice (LATTICE^2 images, rows from z_2 = 2 down to -2) as one
    panel, with z_1 and z_2 ticks at each image's centre, so that it reads against Fig. 3."""
    plt = utils.pyplot()
    # drawn at the size the lab prints it (60 % of the text width), so that its labels
    # print at their 8 pt
    fig, axes = plt.subplots(1, len(decoded), figsize=(0.6 * utils.PAGE_WIDTH, 2.0))
    step = 4 / (LATTICE - 1)                    # latent units between neighbouring images
    half = LATTICE / 2 * step                   # the images abut: no padding lines across them
    for ax, (name, images) in zip(axes, decoded.items()):
        ax.imshow(utils.image_grid(images, LATTICE, value_range=(0, 1), padding=0).numpy(),
                  cmap="gray", vmin=0, vmax=1, extent=(-half, half, -half, half),
                  interpolation="none")
        ax.set_xticks(range(-2, 3))
        ax.set_yticks(range(-2, 3))
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
        ax.set_title(name)
    utils.save_figure(fig, path)


def plot_error_bars(path, results, ink):
    """Each method's squared error per digit relative to the digit's ink (its test images' mean
    sum of squared pixels), with whiskers of one standard error: the ranking of 4.1, 4.5 and
    4.9, which Table 1's raw errors (favouring digits with little ink) do not show."""
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(utils.HALF_WIDTH, 2.2))
    # PPCA's closed form matches its gradient fit to the table's last digit: one bar for both
    labels = {"pca": "PCA", "ppca_gradient": "PPCA", "vae": "VAE"}
    width = 0.27
    for k, (name, label) in enumerate(labels.items()):
        vals = [results[name]["test_sq_error_per_digit"][str(d)] / ink[str(d)] for d in range(10)]
        ses = [results[name]["test_sq_error_se_per_digit"][str(d)] / ink[str(d)] for d in range(10)]
        ax.bar(np.arange(10) + (k - 1) * width, vals, width, yerr=ses, capsize=1,
               error_kw={"lw": 0.6}, label=label)
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("squared error / ink")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    utils.save_figure(fig, path)


def lab_images(train_images: int, test_images: int):
    """The first `train_images` training and `test_images` test images as flat vectors in
    [0, 1], with their labels; refused (before any work) if a digit has fewer than two test
    images, since its spread (its ellipse, its error's standard error) needs two."""
    train_x, train_y, test_x, test_y = utils.mnist_tensors("unit")
    train_x, test_x = train_x[:train_images].view(-1, D), test_x[:test_images].view(-1, D)
    train_y, test_y = train_y[:train_images], test_y[:test_images]
    counts = torch.bincount(test_y, minlength=10)
    if counts.min() < 2:
        raise utils.UsageError(f"the first {test_images} test images hold {int(counts.min())} of "
                               f"digit {int(counts.argmin())}, and each digit needs at least 2; "
                               f"use more (--test-images)")
    return train_x, train_y, test_x, test_y


def ink_per_digit(test_x, test_y) -> dict:
    """What each digit's squared error is measured against (Q4.1): its ink, its test images'
    mean sum of squared pixels (the error is a sum over pixels, so digits with more ink have
    more to get wrong)."""
    ink = test_x.double().pow(2).sum(1)
    return {str(d): ink[test_y == d].mean().item() for d in range(10)}


def main(run: utils.Run, argv=None):
    args = parse_args(argv)
    device = utils.device_and_seeds(args.device, args.seed)
    train_x, train_y, test_x, test_y = lab_images(args.train_images, args.test_images)

    # The lab VAE and its resumable state first: a bad checkpoint fails before any work.
    lab_vae = LabVAE().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(lab_vae.parameters(), lr=args.lr)
    steps = utils.steps_per_epoch(len(train_x), args.batch_size)
    scheduler = utils.one_cycle(optimizer, args.lr, args.epochs * steps, warmup=0.15)
    config = utils.run_config(args, ignore=("ppca_lr", "ppca_tol", "ppca_max_iter", "test_images"))
    # Bookkeeping (utils.Training): the objects named below are restored from checkpoint_last.pt
    # if an earlier run was interrupted, and saved there after each epoch. The loop is the algorithm.
    training = utils.Training(run, args.out, config, args.fresh, args.epochs, steps, "VAE d=2",
                              series=("train_elbo",), model=lab_vae, optimizer=optimizer,
                              scheduler=scheduler)
    out, timings = training.out, {}

    t0 = time.perf_counter()
    results, encodings, recons = {}, {}, {}
    results["pca"], encodings["PCA"], recons["pca"], eigen = pca_answers(train_x, test_x, test_y)
    timings["pca"], t0 = time.perf_counter() - t0, time.perf_counter()
    fit_args = {"lr": args.ppca_lr, "tol": args.ppca_tol, "max_iter": args.ppca_max_iter,
                "seed": args.seed}
    ppca, comparison, (encodings["PPCA"], recons["ppca_gradient"]), params, curve, cov = ppca_answers(
        train_x, test_x, test_y, eigen, fit_args)
    results.update(ppca)
    timings["ppca"], t0 = time.perf_counter() - t0, time.perf_counter()

    train_lab_vae(training, lab_vae, optimizer, scheduler, train_x.to(device), args.batch_size)
    utils.save_checkpoint(lab_vae.state_dict(), out / "vae2d_final.pt")
    results["vae"], encodings["VAE"], recons["vae"] = vae_answers(lab_vae, test_x, test_y, device)
    results["vae"].update(train_elbo_per_epoch=training.history["train_elbo"], epochs=args.epochs)
    timings["vae"] = time.perf_counter() - t0     # this run only (a resumed run skips epochs)
    timings["vae_training_all_epochs"] = sum(training.history["epoch_seconds"])

    answers, show = reconstruction_answers(recons, test_x, test_y, train_x[:NEIGHBOUR_IMAGES],
                                           train_y[:NEIGHBOUR_IMAGES])
    for name, answer in answers.items():
        results.setdefault(name, {}).update(answer)
    geometry = {name.lower(): digit_geometry(z.double(), test_y) for name, z in encodings.items()}
    mean_images = mean_code_images(geometry, eigen, params["ppca_gradient"][:2], lab_vae, device)
    decoded = decoded_mean_codes(mean_images, train_x[:NEIGHBOUR_IMAGES],
                                 train_y[:NEIGHBOUR_IMAGES])
    # Figure 1: the shown images' reconstructions, each titled with the digit it is named as,
    # then each digit's mean code decoded (4.1, 4.5, 4.9 ask which digits are *decoded* well)
    methods = (("PCA", "pca", "pca"), ("PPCA", "ppca_gradient", "ppca"), ("VAE", "vae", "vae"))
    recon_rows = {"original": (test_x[show], None),
                  **{label: (recons[key][show], results[key]["shown_named"])
                     for label, key, _ in methods},
                  **{f"{label} mean": (mean_images[code], decoded[code]["named"])
                     for label, _, code in methods}}
    # 4.6: PPCA's extra error over PCA on the same images (paired, so that the images cancel)
    comparison["ppca_minus_pca_sq_error"] = utils.mean_and_se(
        sq_error_per_image(test_x, recons["ppca_gradient"]) - sq_error_per_image(test_x, recons["pca"]))
    ink = ink_per_digit(test_x, test_y)
    plot_figures(out, encodings, test_y, recon_rows, results, ink,
                 (params["ppca_gradient"], params["ppca_closed_form"], curve, eigen[0], cov),
                 lab_vae, args.seed, device)
    blur = prior_sample_blur(*params["ppca_gradient"][:2], lab_vae, test_x, args.seed, device)
    metrics = {**results, "encodings": geometry, "ppca_comparison": comparison,
               "decoded_mean_codes": decoded,
               "test_ink_per_digit": ink,
               "prior_sample_mid_grey": blur,
               "answers": {**lab_answers(results, geometry, ink),
                           **lost_beyond_blur(results, test_y),
                           **kept_beyond_false_alarms(results, test_y),
                           **pairs_decoded_as_one(geometry, decoded),
                           **method_verdicts(results, comparison, geometry)},
               "seconds": timings, "train_images": len(train_x), "test_images": len(test_x),
               "lattice": LATTICE, "scatter_points": min(SCATTER_POINTS, len(test_x)),
               **utils.run_facts(run, device, args)}
    utils.write_metrics(out / "metrics.json", metrics)
    print("test squared error: " + ", ".join(f"{k} {results[k]['test_sq_error']:.2f}"
                                             for k in ("pca", "ppca_gradient", "ppca_closed_form",
                                                       "vae"))
          + f"; {timings['pca'] + timings['ppca'] + timings['vae']:.0f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
