"""HUJI 67912 Exercise 1, Part 2, Q3: a generator trained by latent optimization (Eq. 6).

Each of the 5,000 training images owns its q = N(mu_i, sigma_i^2 I), stored in tables indexed by
the image's position in the fixed subset, so a shuffled batch always reads its own rows.
Figures: reconstructions at epochs 1, 5, 10, 20, 30 (training images, and validation images whose
latents are fitted with the decoder frozen), compared with Q1, and prior samples beside Q2's.
Like for like: the training latents get 30 updates (one per epoch) and the validation fits 300
steps, so both decoders (this one and Q1's) also get the same 300-step latent fit on the same
training and validation images, separating the optimizer's budget from the method.
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
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from tqdm import tqdm

import model as vae_model
import utils

# Flags that change only what happens after training: a checkpoint made with others resumes.
AFTER_TRAINING = ("amortized", "classifier", "fit_steps", "fit_lr", "compare_per_digit")
Q_LOSS_DRAWS = 64       # z ~ q per image when a whole q is judged by the loss (q_loss)


def init_latents(n: int, latent_dim: int, seed: int, device=None):
    """Q3's initialization: mu ~ N(0, I) and r = log sigma^2 with sigma ~ N(0, I). sigma^2 is
    floored at 1e-8 so that a draw of exactly 0 cannot give log 0 = -inf."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, latent_dim, generator=gen)
    sigma = torch.randn(n, latent_dim, generator=gen)
    logvar = torch.log(sigma.pow(2).clamp_min(1e-8))
    return mu.to(device), logvar.to(device)


class LatentTable(nn.Module):
    """Per-image mu_i and r_i = log sigma_i^2, initialized as Q3 asks. Sparse embeddings: each
    row is updated only in the step that uses its image (once per epoch)."""

    def __init__(self, n_images: int, latent_dim: int, seed: int):
        super().__init__()
        mu, logvar = init_latents(n_images, latent_dim, seed)
        self.mu = nn.Embedding.from_pretrained(mu, freeze=False, sparse=True)
        self.logvar = nn.Embedding.from_pretrained(logvar, freeze=False, sparse=True)

    def forward(self, idx, xb=None):
        return self.mu(idx), self.logvar(idx)

    def state_as_tensors(self) -> dict:
        """The tables as plain tensors on the CPU, for a snapshot."""
        return {"mu": self.mu.weight.detach().cpu(), "logvar": self.logvar.weight.detach().cpu()}


# The curves logged each epoch: train_epoch's running averages, and the monitor images' MSE
SERIES = ("train_loss", "train_mse", "train_kl", "train_recon_mse")


def train_epoch(decoder, latents, optimizers, x, batch_size, progress) -> dict:
    """One pass over the training images in shuffled batches: look up each image's own q, sample
    z with a fresh eps, decode, and one step of both optimizers (the decoder's Adam, the
    tables' sparse Adam) on the loss of Eq. 6. Returns the running averages of the loss parts."""
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
    for idx in utils.batches(len(x), batch_size, shuffle=True, device=x.device):
        mu, logvar = latents(idx)
        loss, mse, kl = vae_model.vae_loss(x[idx], decoder(vae_model.reparameterize(mu, logvar)),
                                           mu, logvar)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        for key, value in zip(sums, (loss, mse, kl)):
            sums[key] += value.item() * len(idx)
        progress.update(1)
    return {key: value / len(x) for key, value in sums.items()}


def fit_latents(decoder, x, steps: int, lr: float, init_seed: int, progress):
    """Test-time latent optimization: with the decoder frozen, fit each image's own mu and
    r = log sigma^2 by Adam on the loss of Eq. 6 (initialized as in Q3: mu ~ N(0, I),
    sigma ~ N(0, I)). Returns (mu, logvar)."""
    mu, logvar = init_latents(len(x), decoder.latent_dim, init_seed, device=x.device)
    mu, logvar = mu.requires_grad_(), logvar.requires_grad_()
    opt = torch.optim.Adam([mu, logvar], lr=lr)
    trainable = [p for p in decoder.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            loss, _, _ = vae_model.vae_loss(x, decoder(vae_model.reparameterize(mu, logvar)), mu,
                                            logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.update(1)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return mu.detach(), logvar.detach()


def snapshot_reconstructions(out, snapshots, decoder, data, fit, device):
    """Q3's reconstructions at each snapshot epoch of the figures' images: training images from
    their own latents, validation images from latents fitted to the frozen decoder. Returns
    (training rows, validation rows, the validation reconstruction error per epoch)."""
    show_train = data["show_train"].to(device)
    show_val_x = data["val_x"][data["show_val"].to(device)]
    rows_train, rows_val, val_fit = [data["train_x"][show_train]], [show_val_x], {}
    for epoch in snapshots:
        ckpt = vae_model.load_snapshot(out / f"decoder_epoch{epoch}.pt", decoder,
                                       "vae_latent_opt", device, vae_model.OWN_SNAPSHOT)
        if "mu" not in ckpt:
            raise utils.CheckpointError(f"{out / f'decoder_epoch{epoch}.pt'} holds no latent "
                                        f"table; run with --fresh")
        with torch.no_grad():
            rows_train.append(decoder(ckpt["mu"].to(device)[show_train]))
        mu, _ = fit(decoder, show_val_x)
        with torch.no_grad():
            rows_val.append(decoder(mu))
        val_fit[str(epoch)] = vae_model.reconstruction_mse(decoder, mu, show_val_x)
    return rows_train, rows_val, val_fit


def same_budget(decoder, x, n_train, proposed_train, proposed_val, fit) -> dict:
    """Reconstruction errors of one decoder on the comparison images (the first n_train of x
    from training, the rest validation): from the latents its method proposes, and from a
    fresh latent fit of the same budget for both methods, separating the budget from the
    method."""
    mu, _ = fit(decoder, x)

    @torch.no_grad()
    def mse(m, images):                 # per image, the mean over its pixels
        return (decoder(m) - images).pow(2).flatten(1).mean(1).double().cpu()

    per_image = {"proposed_train": mse(proposed_train, x[:n_train]),
                 "proposed_val": None if proposed_val is None else mse(proposed_val, x[n_train:]),
                 "fitted_train": mse(mu[:n_train], x[:n_train]),
                 "fitted_val": mse(mu[n_train:], x[n_train:])}
    return {**{k: None if v is None else v.mean().item() for k, v in per_image.items()},
            "per_image": per_image}


@torch.no_grad()
def q_loss(decoder, mu, logvar, x, draws: int = Q_LOSS_DRAWS) -> torch.Tensor:
    """Per image, the exercise's loss (Eq. 5 and 6, the objective both methods minimize) at the
    q a method proposes, N(mu, diag exp(logvar)): the pixel-mean squared error expected under
    z ~ q (over `draws` samples, a fixed generator) plus the KL averaged over latent
    dimensions. It judges the whole q, its spread as well as its mean."""
    gen = torch.Generator(device=mu.device).manual_seed(0)
    mse = torch.zeros(len(x), dtype=torch.float64, device=mu.device)
    for _ in range(draws):
        z = vae_model.reparameterize(mu, logvar, torch.randn(mu.shape, generator=gen,
                                                             device=mu.device))
        mse += (decoder(z) - x).pow(2).flatten(1).mean(1).double()
    kl = vae_model.kl_std_normal(mu, logvar).mean(1).double()
    return (mse / draws + kl).cpu()


def paired_difference(a, b) -> dict:
    """Mean of a - b over the same images, and its standard error (the differences' standard
    deviation over sqrt(n)): whether two methods differ by more than chance on these images."""
    return utils.mean_and_se(a - b)


@torch.no_grad()
def prior_samples(decoder, amortized, z) -> dict:
    """The same prior latents z (Q2's) through both final generators, by method."""
    samples = {"latent_opt": decoder(z)}
    if amortized is not None:
        samples["amortized"] = amortized.decoder(z)
    return samples


def judge_priors(classifier, samples: dict):
    """Both generators' prior samples judged by Part 1's classifier (None without it)."""
    if classifier is None:
        return None
    return {method: utils.classify_samples(classifier, images)
            for method, images in samples.items()}


# Mid-grey: neither background (-1) nor stroke (+1) on the [-1, 1] scale, |pixel| < GREY_BAND.
# Blur spreads a stroke into grey, so the share of such pixels measures blur without asking the
# classifier. The band is our choice: the direct test repeats its verdict at OTHER_GREY_BANDS to
# show whether the verdict hangs on it.
GREY_BAND, OTHER_GREY_BANDS = 0.8, (0.5, 0.95)


def mid_grey(images, band: float = GREY_BAND) -> torch.Tensor:
    return (images.abs() < band).double()


def grey_share(images) -> float:
    return mid_grey(images).mean().item()


def grey_per_image(images, band: float = GREY_BAND) -> torch.Tensor:
    """Each image's share of mid-grey pixels."""
    return mid_grey(images, band).flatten(1).mean(1)


def not_greyer(a: dict, b: dict) -> bool:
    """Are images `a` ({share, se}) no greyer than `b`: not above them by two standard errors
    of the difference or more?"""
    return a["share"] - b["share"] < 2 * math.hypot(a["se"], b["se"])


def variety_ratio(variety: dict) -> dict:
    """Prior draws' variety as a fraction of the training latents' ({prior, aggregate}, each a
    mean and its standard error), with its standard error by the delta method."""
    p, a = variety["prior"], variety["aggregate"]
    a_mean = max(a["mean"], 1e-12)        # a decoder whose every output is the same image
    ratio = p["mean"] / a_mean
    return {"ratio": ratio, "se": math.hypot(p["se"], ratio * a["se"]) / a_mean}


def aggregate_draws(table_mu, table_logvar, n: int, seed: int):
    """n draws from the latents a decoder was trained on (the aggregate posterior): each from
    the q_i of a random training image."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(table_mu), (n,), generator=gen).to(table_mu.device)
    eps = torch.randn(n, table_mu.shape[1], generator=gen).to(table_mu.device)
    return table_mu[pick] + (0.5 * table_logvar[pick]).exp() * eps


@torch.no_grad()
def prior_against_aggregate(decoder, table_mu, table_logvar, prior_images, seed: int,
                            classifier=None) -> dict:
    """Q3's prior tested directly: does the decoder render prior draws as well as draws from
    the latents it was trained on (the aggregate posterior: the q_i of a random training image)?
    As many draws of each, judged by their variety (`utils.variety_per_image`: mean, standard error),
    by their mid-grey share per image (blur), the same verdict with the grey band at each of
    OTHER_GREY_BANDS, and, given the Part 1 classifier, by the digits it reads."""
    z = aggregate_draws(table_mu, table_logvar, len(prior_images), seed)
    images = {"prior": prior_images, "aggregate": decoder(z)}
    variety = {name: utils.mean_and_se(utils.variety_per_image(x)) for name, x in images.items()}

    def shares(band):
        grey = {name: utils.mean_and_se(grey_per_image(x, band)) for name, x in images.items()}
        return {name: {"share": g["mean"], "se": g["se"]} for name, g in grey.items()}

    def verdict(s):
        return not_greyer(s["prior"], s["aggregate"])
    result = shares(GREY_BAND)
    main_verdict = verdict(result)
    other_shares = {str(band): shares(band) for band in OTHER_GREY_BANDS}
    other = {band: verdict(s) for band, s in other_shares.items()}
    return {**result, "images": len(prior_images), "prior_not_greyer": main_verdict,
            "other_bands_not_greyer": other, "other_bands": other_shares,
            "same_verdict_every_band": all(v == main_verdict for v in other.values()),
            "variety": variety, "variety_ratio": variety_ratio(variety),
            "classified": judge_priors(classifier, images)}


# A prior draw lies outside the training latents when their mixture gives it a lower density
# than it gives all but OUTSIDE_SHARE of its own draws: a prior that matched the mixture would
# put OUTSIDE_SHARE of its draws there.
OUTSIDE_SHARE = 0.01
# A dimension of q_i counts as narrow when its variance is below half the prior's: a prior draw's
# mean squared distance from q_i's mean there, 1 + mu^2, exceeds twice q_i's variance sigma^2.
NARROW_VARIANCE = 0.5


@torch.no_grad()
def prior_outside_latents(table_mu, table_logvar, prior_z, seed: int) -> dict:
    """Q3 (b): do prior draws land where the decoder was trained? Means and variances cannot
    tell, so each prior draw is scored under the aggregate posterior itself (the mixture of the
    training images' q_i), against as many of that mixture's own draws (`aggregate_draws`, the
    same as prior_against_aggregate's). Returns the share of prior draws outside (below the
    OUTSIDE_SHARE quantile of the own draws' log q) with its standard error, and
    KL(p || q) = E_p[log p(z) - log q(z)] over the prior draws (mean, standard error): prior
    mass where no q_i has any. Also the mean number of dimensions per image in which q_i is
    narrow (variance below NARROW_VARIANCE), and in how many dimensions any image's is: a prior
    draw must fit one q_i in all of its narrow dimensions at once."""
    log_q = functools.partial(vae_model.aggregate_posterior_log_prob, mu=table_mu,
                              logvar=table_logvar)
    own = log_q(aggregate_draws(table_mu, table_logvar, len(prior_z), seed))
    prior = log_q(prior_z)
    outside = (prior < torch.quantile(own, OUTSIDE_SHARE)).double()
    log_ratio = vae_model.log_normal_pdf(prior_z.double(), 0.0, 0.0) - prior
    narrow = table_logvar.exp() < NARROW_VARIANCE
    return {"outside": utils.mean_and_se(outside), "expected": OUTSIDE_SHARE,
            "kl_prior_to_latents": utils.mean_and_se(log_ratio), "draws": len(prior_z),
            "narrow_dimensions": utils.mean_and_se(narrow.sum(dim=1).double()),
            "narrow_in_any_image": int(narrow.any(dim=0).sum()), "narrow_variance": NARROW_VARIANCE}


# Q3 (b): how much digit order a table of latents carries, by a vote of this many nearest
# neighbours among the other images' latent means (5-fold cross-validation)
ORDER_NEIGHBOURS = 5


def digit_order(mu, labels, seed: int) -> dict:
    """The share of training images whose digit a vote of their ORDER_NEIGHBOURS nearest
    neighbours names right, the neighbours' latent means compared with the image's own, each
    image voted on by a model fitted without its fold (mean and standard error over images).
    An encoder maps similar images to nearby latents; latents each fitted on their own from a
    random start need not."""
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    y = labels.cpu().numpy()
    named = cross_val_predict(KNeighborsClassifier(ORDER_NEIGHBOURS), mu.detach().cpu().numpy(),
                              y, cv=folds)
    return {**utils.mean_and_se(torch.from_numpy(named == y).double()),
            "neighbours": ORDER_NEIGHBOURS}


def outside_gap(outside: dict, outside_amortized: dict) -> str:
    """Do more of this decoder's prior draws fall outside its training latents
    (`prior_outside_latents`) than Q1's fall outside its encoder's q: 'more', 'same' or
    'fewer', by the two-proportion test: 'same' unless the shares differ by two standard
    errors of the difference under one pooled share (so two equal shares, even both 0 or
    both 1, are the 'same'). The test treats the two shares as independent; they score the
    same prior draws, so a paired test (McNemar's) would be sharper, and the 1 % threshold is
    itself estimated. Both only matter for shares close together, not for 1,000 against 9."""
    lo, am = outside["outside"]["mean"], outside_amortized["outside"]["mean"]
    n_lo, n_am = outside["draws"], outside_amortized["draws"]
    pooled = (lo * n_lo + am * n_am) / (n_lo + n_am)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_lo + 1 / n_am))
    if abs(lo - am) <= 2 * se:
        return "same"
    return "more" if lo > am else "fewer"


def prior_gaps(versus: dict, versus_amortized: dict) -> dict:
    """Each decoder's prior shortfall (prior draws' mid-grey share minus its training latents'),
    from two prior_against_aggregate results (or their shares at one band), and the standard
    error of the difference of the two shortfalls."""
    gap = {name: v["prior"]["share"] - v["aggregate"]["share"]
           for name, v in (("latent_opt", versus), ("amortized", versus_amortized))}
    se = math.sqrt(sum(v[k]["se"] ** 2 for v in (versus, versus_amortized)
                       for k in ("prior", "aggregate")))
    return {**gap, "difference": gap["latent_opt"] - gap["amortized"], "difference_se": se}


def prior_gap(versus: dict, versus_amortized: dict) -> str:
    """How this decoder's prior shortfall compares with Q1's VAE's (`prior_gaps`): 'same' within
    two standard errors of their difference, else 'larger' or 'smaller'."""
    gaps = prior_gaps(versus, versus_amortized)
    if abs(gaps["difference"]) < 2 * gaps["difference_se"]:
        return "same"
    return "larger" if gaps["difference"] > 0 else "smaller"


def variety_gap(versus: dict, versus_amortized: dict) -> str:
    """How this decoder's prior draws fall short of its training latents in variety, against
    Q1's VAE's: 'same' where the two ratios (`variety_ratio`) lie within two standard errors of
    their difference, else 'larger' (a lower ratio: a larger shortfall) or 'smaller'."""
    lo, am = versus["variety_ratio"], versus_amortized["variety_ratio"]
    if utils.within_two_se(lo["ratio"], am["ratio"], lo["se"], am["se"]):
        return "same"
    return "larger" if lo["ratio"] < am["ratio"] else "smaller"


def grey_shares(samples: dict, real) -> dict:
    """Q3's samples judged without the classifier: the share of mid-grey pixels in each
    generator's prior samples, and in as many real validation images."""
    return {**{method: grey_share(images) for method, images in samples.items()},
            "real": grey_share(real[:len(samples["latent_opt"])])}


def prior_question(decoder, amortized, classifier, table_mu, table_logvar, train_x, val_x,
                   train_y) -> dict:
    """Q3's prior question: the same prior latents through both final generators, judged by the
    Part 1 classifier and by their mid-grey pixels; each decoder's prior draws against draws
    from the latents it was trained on (this decoder's table; Q1's encoder's q of the same
    training images), so that the prior's part and the decoder's part of the difference
    between the two generators' samples can be told apart; whether prior draws land where
    each decoder's training latents lie (`prior_outside_latents`); how much digit order each
    table of latents carries (`digit_order`); and how far the latents are
    from N(0, I)."""
    latent_dim = table_mu.shape[1]
    prior_z = vae_model.prior_latents(utils.QUALITY_SAMPLES, latent_dim,
                                      utils.QUALITY_SEED).to(table_mu.device)
    samples = prior_samples(decoder, amortized, prior_z)
    result = {"sample_quality": judge_priors(classifier, samples),
              "grey_share": grey_shares(samples, val_x), "grey_band": GREY_BAND,
              # as many real validation images, for scale
              "real_variety": utils.mean_and_se(utils.variety_per_image(val_x[:len(samples["latent_opt"])])),
              "real_grey_per_image": utils.mean_and_se(
                  grey_per_image(val_x[:len(samples["latent_opt"])])),
              "prior_vs_aggregate": prior_against_aggregate(decoder, table_mu, table_logvar,
                                                            samples["latent_opt"],
                                                            utils.QUALITY_SEED, classifier),
              "prior_outside": prior_outside_latents(table_mu, table_logvar, prior_z,
                                                     utils.QUALITY_SEED),
              "digit_order": digit_order(table_mu, train_y, utils.QUALITY_SEED),
              **latent_statistics(table_mu, table_logvar, latent_dim)}
    if amortized is not None:
        with torch.no_grad():
            mu, logvar = (torch.cat(t) for t in zip(*map(amortized.encoder, train_x.split(1000))))
        result["amortized_prior_vs_aggregate"] = prior_against_aggregate(
            amortized.decoder, mu, logvar, samples["amortized"], utils.QUALITY_SEED, classifier)
        result["prior_gaps"] = prior_gaps(result["prior_vs_aggregate"],
                                          result["amortized_prior_vs_aggregate"])
        result["amortized_prior_outside"] = prior_outside_latents(mu, logvar, prior_z,
                                                                  utils.QUALITY_SEED)
        result["amortized_digit_order"] = digit_order(mu, train_y, utils.QUALITY_SEED)
    return result


# Latents taken together count as close to N(0, I) below this moment-matched KL per dimension
# (the KL of a unit Gaussian shifted by 0.32 of its standard deviation).
CLOSE_KL = 0.05

# Q3 (b)'s control: the same training with the latents' means started WIDE_START times wider than
# the prior (mu_i ~ N(0, WIDE_START^2 I)). Each q_i is updated once per epoch, so where the
# latents end tells the initialization's part in the prior from the KL term's.
WIDE_START = 3.0


def start_control(train_x, latent_dim: int, epochs: int, batch_size: int, lr: float,
                  latent_lr: float, seed: int, device, mu_scale: float = 1.0,
                  unit_sigma: bool = False) -> dict:
    """Q3's training again from another start: the latent means scaled by mu_scale, and with
    unit_sigma every sigma_i = 1 (r_i = 0) instead of sigma_i ~ N(0, 1). Returns how far its
    latents start and end from N(0, I) (moment-matched KL, mean marginal variance), beside Q3's
    own start, its decoder's prior draws against draws from its trained latents
    (`prior_against_aggregate`), and where prior draws land (`prior_outside_latents`). Seeded
    on its own generator state, so that it changes nothing else in the run."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        decoder = vae_model.Decoder(latent_dim).to(device)
        latents = LatentTable(len(train_x), latent_dim, seed).to(device)
        q3_start = spread(latents.mu.weight, latents.logvar.weight)      # Q3's table at its start
        with torch.no_grad():
            latents.mu.weight.mul_(mu_scale)
            if unit_sigma:
                latents.logvar.weight.zero_()
        start = spread(latents.mu.weight, latents.logvar.weight)
        optimizers = [torch.optim.Adam(decoder.parameters(), lr=lr),
                      torch.optim.SparseAdam(list(latents.parameters()), lr=latent_lr)]
        steps = utils.steps_per_epoch(len(train_x), batch_size)
        desc = "Q3 control: " + ("every sigma_i started at 1" if unit_sigma
                                 else f"latent means started {mu_scale:g} times wider")
        with tqdm(total=epochs * steps, desc=desc, unit="batch") as progress:
            for _ in range(epochs):
                train_epoch(decoder, latents, optimizers, train_x, batch_size, progress)
        decoder.eval()
        mu, logvar = latents.mu.weight.detach(), latents.logvar.weight.detach()
        prior_z = vae_model.prior_latents(utils.QUALITY_SAMPLES, latent_dim,
                                          utils.QUALITY_SEED).to(device)
        with torch.no_grad():
            prior_images = decoder(prior_z)
        versus = prior_against_aggregate(decoder, mu, logvar, prior_images, utils.QUALITY_SEED)
    return {"start_scale": mu_scale, "unit_sigma": unit_sigma, **spread(mu, logvar),
            "at_start": start, "q3_at_start": q3_start,
            "prior_vs_aggregate": {k: versus[k] for k in ("prior", "aggregate", "images",
                                                               "variety", "variety_ratio")},
            "prior_outside": prior_outside_latents(mu, logvar, prior_z, utils.QUALITY_SEED)}


def wide_start_control(train_x, latent_dim: int, epochs: int, batch_size: int, lr: float,
                       latent_lr: float, seed: int, device) -> dict:
    """Q3 (b)'s first control: the latent means started WIDE_START times wider."""
    return start_control(train_x, latent_dim, epochs, batch_size, lr, latent_lr, seed, device,
                         mu_scale=WIDE_START)


def unit_sigma_control(train_x, latent_dim: int, epochs: int, batch_size: int, lr: float,
                       latent_lr: float, seed: int, device) -> dict:
    """Q3 (b)'s second control: every sigma_i started at 1 (r_i = 0). Q3's sigma_i ~ N(0, 1)
    gives sigma_i^2 ~ chi^2_1, below NARROW_VARIANCE in about half of each q_i's dimensions
    (P(|N(0, 1)| < 0.71) = 0.52), at random places for each image."""
    return start_control(train_x, latent_dim, epochs, batch_size, lr, latent_lr, seed, device,
                         unit_sigma=True)


def narrow_from_start(start_logvar, logvar) -> dict:
    """Where the narrow dimensions of the trained q_i (variance below NARROW_VARIANCE) come
    from: the mean number per image at the start, at the end, and at the end among those
    already narrow at the start; and the largest change of any r_i = log sigma_i^2 over the
    training, which bounds how far a narrow start can widen (Adam's steps are about its
    learning rate each, and each latent gets one per epoch)."""
    start_logvar, logvar = start_logvar.detach().cpu(), logvar.detach().cpu()
    start, end = (lv.exp() < NARROW_VARIANCE for lv in (start_logvar, logvar))
    return {**{name: n.sum(dim=1).double().mean().item()
               for name, n in (("at_start", start), ("at_end", end), ("at_both", start & end))},
            "max_log_variance_change": (logvar - start_logvar).abs().max().item()}


def spread(mu, logvar) -> dict:
    """How far a latent table, taken together, is from N(0, I): its moment-matched KL and its
    mean marginal variance per dimension."""
    return {"aggregate_posterior_kl": vae_model.aggregate_posterior_kl(mu, logvar),
            "marginal_variance_mean": vae_model.aggregate_posterior_per_dimension(
                mu, logvar)["marginal_variance_mean"]}


def plot_figures(out, snapshots, history, rows_train, rows_val, prior_rows, with_amortized):
    epochs = list(range(1, len(history["train_loss"]) + 1))
    utils.plot_curves(out / "loss_curves.png", {
        "loss (Eq. 6: MSE + mean KL)": {"train (running)": (epochs, history["train_loss"])},
        "reconstruction MSE (mean of q)": {"training (Q1's curve images)":
                                           (epochs, history["train_recon_mse"])},
        "KL per latent dimension (nats)": {"train (running)": (epochs, history["train_kl"])},
    })
    labels = [f"epoch {e}" for e in snapshots]
    amortized_row = ["Q1 amortized"] if with_amortized else []
    utils.plot_image_rows(out / "q3_reconstructions_train.png", rows_train,
                          ["original"] + labels + amortized_row, col_labels=list(range(10)))
    utils.plot_image_rows(out / "q3_reconstructions_val.png", rows_val,
                          ["original"] + labels + amortized_row, col_labels=list(range(10)))
    # Wider than half a page: the report sets it beside a narrower text column, so each digit
    # prints at about 1 cm.
    utils.plot_image_rows(out / "q3_prior_samples.png", prior_rows,
                          (["amortized"] if with_amortized else []) + ["latent opt."], width=4.4)


def q3_verdicts(same: dict, quality, aggregate_kl=None, latent_dim=None, aggregate=None,
                grey=None, versus=None, versus_amortized=None, control=None, outside=None,
                outside_amortized=None) -> dict:
    """Q3's answers as named outcomes: which method proposes better q (`proposal_verdicts`),
    and whether the initialization established a good prior (`prior_verdicts`)."""
    return {**proposal_verdicts(same),
            **prior_verdicts(quality, aggregate_kl, latent_dim, aggregate, grey, versus,
                             versus_amortized, control, outside, outside_amortized)}


def unit_sigma_verdicts(unit: dict, versus: dict, outside_amortized) -> dict:
    """Q3 (b)'s second control against the run itself: unit_outside_gap, do 'more', the 'same'
    share or 'fewer' of its prior draws land outside its latents than Q1's outside its encoder's
    q (`outside_gap`; None without Q1's VAE); unit_variety_gap, do its prior draws fall short of
    its training latents in variety by the 'same' fraction as Q3's own, a 'larger' or a
    'smaller' one (`variety_gap`)."""
    return {"unit_outside_gap": None if outside_amortized is None
            else outside_gap(unit["prior_outside"], outside_amortized),
            "unit_variety_gap": variety_gap(unit["prior_vs_aggregate"], versus)}


def proposal_verdicts(same: dict) -> dict:
    """Q3 (a), from the same-budget comparison (None without Q1's VAE). better_q: whose own
    proposals (the encoder's mu(x) or the table's mu_i) reconstruct the same training images
    better; better_q_by_loss: whose whole q (mean and spread) has the lower loss (`q_loss`);
    better_decoder: whose decoder reconstructs better when both get the same latent fit (the
    budget taken out); encoder_nearer_best: whether the encoder's proposals gain less from the
    same refit to their own decoder than the learned mu_i do (the proposals without their
    decoders)."""
    if "amortized" not in same:
        return {"better_q": None, "better_decoder": None}
    a, lo = same["amortized"], same["latent_opt"]
    verdicts = {"better_q": "amortized" if a["proposed_train"] < lo["proposed_train"] else "latent_opt",
                "better_decoder": "amortized" if a["fitted_train"] < lo["fitted_train"] else "latent_opt",
                "encoder_nearer_best": (a["proposed_train"] - a["fitted_train"]
                                        < lo["proposed_train"] - lo["fitted_train"])}
    if "proposed_train_loss" in a:
        verdicts["better_q_by_loss"] = ("amortized" if a["proposed_train_loss"]
                                        < lo["proposed_train_loss"] else "latent_opt")
    return verdicts


def prior_verdicts(quality, aggregate_kl=None, latent_dim=None, aggregate=None, grey=None,
                   versus=None, versus_amortized=None, control=None, outside=None,
                   outside_amortized=None) -> dict:
    """Q3 (b), each None where its measurement is missing. prior: whether the
    latent-optimization samples look as good to the classifier as the amortized ones
    (confidence within 0.05, coverage within one digit); aggregate_near_prior: whether the
    latents the decoder was trained on, taken together, are close to N(0, I) (a moment-matched
    KL under 0.05 nats per latent dimension); codes_overlap: whether the q_i overlap more than
    they are spread (their means vary less, per dimension on average, than each q_i's own
    variance); samples_greyer: whether the latent-optimization samples hold more mid-grey
    pixels (blur) than the amortized ones; blur_mostly_decoder: whether more of that grey gap
    lies between the amortized samples and this decoder's own training latents than between
    those latents and prior draws (`versus`, from prior_against_aggregate); variety_gap: do
    prior draws through this decoder fall short of its own training latents in variety by the
    'same' fraction as through Q1's VAE (`versus_amortized`), a 'larger' or a 'smaller' one
    (`variety_gap`); prior_gap: is this
    decoder's shortfall of prior draws against its own training latents the 'same' as Q1's
    VAE's (`versus_amortized`), 'larger' or 'smaller' (`prior_gap`), and is that verdict the
    same at every grey band; decoder_greyer: does this decoder, fed its own training latents,
    give more mid-grey pixels than Q1's fed its own, by two standard errors or more;
    start_decides: whether the latents of the control started wider (`wide_start_control`)
    end far from N(0, I) (by the same 0.05 nats per dimension) while Q3's end close, so that
    the initialization, not the KL term, placed them; control_prior_greyer: whether the
    control's decoder renders prior draws greyer than its own training latents by more than
    Q3's decoder does (two standard errors of the difference of the two shortfalls);
    outside_gap: do 'more', the 'same' share or 'fewer' of this decoder's prior draws land
    outside its training latents than Q1's outside its encoder's q (`outside_gap`, from
    `prior_outside_latents`)."""
    has_grey = bool(grey) and "amortized" in grey
    verdicts = {"prior": None,
                "aggregate_near_prior": None if aggregate_kl is None
                else aggregate_kl < CLOSE_KL * latent_dim,
                "codes_overlap": None if aggregate is None
                else aggregate["mu_variance_mean"] < aggregate["sigma2_mean"],
                "samples_greyer": grey["latent_opt"] > grey["amortized"] if has_grey else None,
                "blur_mostly_decoder": None if not (versus and has_grey)
                else (versus["aggregate"]["share"] - grey["amortized"]
                      > versus["prior"]["share"] - versus["aggregate"]["share"])}
    if versus and versus_amortized:
        if "variety_ratio" in versus and "variety_ratio" in versus_amortized:
            verdicts["variety_gap"] = variety_gap(versus, versus_amortized)
        verdicts["prior_gap"] = prior_gap(versus, versus_amortized)
        verdicts["prior_gap_same_every_band"] = all(
            prior_gap(versus["other_bands"][band], versus_amortized["other_bands"][band])
            == verdicts["prior_gap"] for band in versus["other_bands"])
        verdicts["decoder_greyer"] = not not_greyer(versus["aggregate"],
                                                    versus_amortized["aggregate"])
    if outside and outside_amortized:
        verdicts["outside_gap"] = outside_gap(outside, outside_amortized)
    if control is not None and aggregate_kl is not None:
        verdicts["start_decides"] = (verdicts["aggregate_near_prior"] and
                                     control["aggregate_posterior_kl"] >= CLOSE_KL * latent_dim)
        if versus:
            gaps = prior_gaps(control["prior_vs_aggregate"], versus)   # the control minus Q3's
            verdicts["control_prior_greyer"] = gaps["difference"] > 2 * gaps["difference_se"]
    if quality is not None and "amortized" in quality:
        lo_q, a_q = quality["latent_opt"], quality["amortized"]
        good = (lo_q["mean_confidence"] >= a_q["mean_confidence"] - 0.05
                and lo_q["digits_covered"] >= a_q["digits_covered"] - 1)
        verdicts["prior"] = "sufficient" if good else "insufficient"
    return verdicts


def parse_args(argv=None):
    parser = utils.script_parser("vae_latent_opt", __doc__.splitlines()[0])
    parser.add_quick_argument("--epochs", 30, 2, "training epochs", type=utils.int_in(1, 10_000))
    utils.add_vae_data_arguments(parser)
    parser.add_argument("--batch-size", type=utils.int_in(1, 8192), default=64,
                        help="batch size")
    parser.add_argument("--lr", type=utils.float_in(1e-8, 10), default=1e-3,
                        help="Adam learning rate of the decoder")
    parser.add_argument("--latent-lr", type=utils.float_in(1e-8, 100), default=1e-2,
                        help="learning rate of the per-image latents (10x, as the exercise says)")
    parser.add_argument("--latent-dim", type=utils.int_in(1, 1024), default=200,
                        help="latent size d")
    parser.add_quick_argument("--fit-steps", 300, 20, "Adam steps fitting latents with a decoder "
                              "frozen (validation images, and the same-budget comparison)",
                              type=utils.int_in(1, 100_000))
    parser.add_argument("--fit-lr", type=utils.float_in(1e-8, 100), default=1e-2,
                        help="learning rate of that test-time latent fit")
    parser.add_quick_argument("--compare-per-digit", 5, 2, "training and validation images per "
                              "digit in the same-budget comparison", type=utils.int_in(1, 20))
    utils.add_file_argument(parser, "--amortized", utils.AMORTIZED_VAE,
                            "Q1's final VAE, for the side-by-side figures and comparisons")
    utils.add_file_argument(parser, "--classifier", utils.CLASSIFIER,
                            "Part 1's classifier.pt, to judge the prior samples")
    return parser.parse_args(argv)


def load_amortized(path, latent_dim, per_class, device):
    """Q1's VAE for the comparisons (None if there is none), checked before any training: its
    latent size and its training images per digit must be this run's."""
    if path is None:
        return None
    amortized, _ = vae_model.load_amortized_vae(path, device, per_class)
    if amortized.latent_dim != latent_dim:
        raise utils.UsageError(f"{path} has latent size {amortized.latent_dim}, this run "
                               f"{latent_dim}; pass --latent-dim {amortized.latent_dim} or "
                               f"another --amortized")
    return amortized


def same_budget_comparison(decoder, table, amortized, data, per_digit, fit, device):
    """Both final decoders on the same images, per_digit training and validation images of each
    digit: the reconstruction error from the latents each method proposes, and from the same
    fresh latent fit for both (`same_budget`); and the loss at each method's whole q on the
    training images (`q_loss`). table = (mu, logvar) of every training image's q. Returns
    ({method: errors}, image counts)."""
    table_mu, table_logvar = table
    compare = {"train": utils.monitor_subset(data["train_y"], per_digit).to(device),
               "val": utils.monitor_subset(data["val_y"], per_digit).to(device)}
    x = torch.cat([data["train_x"][compare["train"]], data["val_x"][compare["val"]]])
    n_train = len(compare["train"])
    same = {"latent_opt": same_budget(decoder, x, n_train, table_mu[compare["train"]], None, fit)}
    losses = {"latent_opt": q_loss(decoder, table_mu[compare["train"]],
                                   table_logvar[compare["train"]], x[:n_train])}
    if amortized is not None:
        with torch.no_grad():
            encoded, encoded_logvar = amortized.encoder(x)
        same["amortized"] = same_budget(amortized.decoder, x, n_train, encoded[:n_train],
                                        encoded[n_train:], fit)
        losses["amortized"] = q_loss(amortized.decoder, encoded[:n_train],
                                     encoded_logvar[:n_train], x[:n_train])
    per_image = {method: errors.pop("per_image") for method, errors in same.items()}
    for method, loss in losses.items():
        same[method]["proposed_train_loss"] = loss.mean().item()
        per_image[method]["proposed_train_loss"] = loss
    # How far each method's own proposals fall short of the same fresh fit to its own decoder:
    # the refits compare the decoders, this shortfall the proposals alone.
    shortfall = {method: e["proposed_train"] - e["fitted_train"] for method, e in per_image.items()}
    for method, s in shortfall.items():
        same[method]["shortfall"] = utils.mean_and_se(s)
    if amortized is not None:           # latent optimization minus amortized, image by image
        same["paired"] = {k: paired_difference(per_image["latent_opt"][k],
                                               per_image["amortized"][k])
                          for k in ("proposed_train", "fitted_train", "fitted_val",
                                    "proposed_train_loss")}
        same["paired"]["shortfall"] = paired_difference(shortfall["latent_opt"],
                                                        shortfall["amortized"])
        # the validation images, as the question compares them: latent optimization's fit
        # to its decoder against the encoder's one-pass proposal
        same["paired"]["val_fit_vs_encoder"] = paired_difference(
            per_image["latent_opt"]["fitted_val"], per_image["amortized"]["proposed_val"])
    return same, {"train": n_train, "val": len(x) - n_train}


@torch.no_grad()
def beside_q1_and_q2(amortized, decoder, rows_train, rows_val, seed: int):
    """The rows that set Q3's figures beside Q1's and Q2's: the amortized VAE's reconstructions
    of the training and validation images (appended to rows_train and rows_val, whose first
    rows hold them) and both generators' samples from the same 10 prior latents as Q2's.
    Returns (prior rows, the amortized reconstruction error of the validation images)."""
    show_val_x, prior_rows, amortized_val10 = rows_val[0], [], None
    z_prior = vae_model.prior_latents(10, decoder.latent_dim, seed).to(show_val_x.device)
    if amortized is not None:
        rows_train.append(amortized.reconstruct(rows_train[0]))
        rows_val.append(amortized.reconstruct(show_val_x))
        amortized_val10 = vae_model.reconstruction_mse(
            amortized.decoder, amortized.encoder(show_val_x)[0], show_val_x)
        prior_rows.append(amortized.decoder(z_prior))
    return prior_rows + [decoder(z_prior)], amortized_val10


def kl_without_correlations(mu, logvar, seed: int) -> float:
    """The moment-matched KL (`model.aggregate_posterior_kl`) of the same latents with each
    dimension's means shuffled across images on its own: the marginals stay, the correlations
    between dimensions go. It is the marginals' KL plus what the estimate shows from sampling
    alone, so the full KL minus it is what the correlations add."""
    gen = torch.Generator().manual_seed(seed)
    mu = mu.detach().double().cpu()
    shuffle = torch.rand(mu.shape, generator=gen, dtype=torch.float64).argsort(dim=0)
    return vae_model.aggregate_posterior_kl(mu.gather(0, shuffle), logvar)


def latent_statistics(mu, logvar, latent_dim: int) -> dict:
    """Q3's prior question from the latents the decoder was trained on: their aggregate
    posterior against N(0, I), as a whole, without the correlations between dimensions
    (`kl_without_correlations`) and per dimension, and their sizes."""
    return {"aggregate_posterior_kl": vae_model.aggregate_posterior_kl(mu, logvar),
            "aggregate_posterior_kl_uncorrelated": kl_without_correlations(mu, logvar,
                                                                           utils.QUALITY_SEED),
            "aggregate_posterior": vae_model.aggregate_posterior_per_dimension(mu, logvar),
            "latent_mu_mean_norm": mu.norm(dim=1).mean().item(), "latent_mu_std": mu.std().item(),
            "latent_sigma2_mean": logvar.exp().mean().item(),
            "expected_prior_norm": float(latent_dim) ** 0.5}


def fits_to_frozen_decoders(out, snapshots, decoder, table, amortized, data, per_digit, fit):
    """Latents fitted to frozen decoders, the same budget (`fit`) for every fit: the validation
    images at each snapshot, then both final decoders on the same comparison images. Returns
    the snapshot rows (training, validation), the validation fits' errors, and the comparison."""
    steps = fit.keywords["steps"]
    with tqdm(total=(len(snapshots) + 1 + (amortized is not None)) * steps, unit="step",
              desc="fitting latents to frozen decoders") as bar:
        fit = functools.partial(fit, progress=bar)
        device = table[0].device
        rows_train, rows_val, val_fit = snapshot_reconstructions(
            out, snapshots, vae_model.Decoder(table[0].shape[1]).to(device).eval(), data, fit,
            device)
        same, same_images = same_budget_comparison(decoder, table, amortized, data, per_digit,
                                                   fit, device)
    return rows_train, rows_val, val_fit, same, same_images


def main(run: utils.Run, argv=None):
    args = parse_args(argv)
    device = utils.device_and_seeds(args.device, args.seed)
    # Every file argument is loaded and checked before the first training step.
    amortized = load_amortized(utils.input_file(args.amortized, utils.AMORTIZED_VAE, args.quick),
                               args.latent_dim, args.per_class, device)
    classifier = vae_model.load_classifier(
        utils.input_file(args.classifier, utils.CLASSIFIER, args.quick), device)
    data = utils.vae_data(args.per_class, args.val_images, device)
    train_x = data["train_x"]

    # Q3: the decoder and every image's own q = N(mu_i, sigma_i^2 I), trained together (Eq. 6)
    decoder = vae_model.Decoder(args.latent_dim).to(device)
    latents = LatentTable(len(train_x), args.latent_dim, args.seed).to(device)
    opt_decoder = torch.optim.Adam(decoder.parameters(), lr=args.lr)
    opt_latents = torch.optim.SparseAdam(list(latents.parameters()), lr=args.latent_lr)
    snapshots = utils.snapshot_epochs(args.epochs)
    monitor = utils.monitor_subset(data["train_y"]).to(device)    # Q1's 1,000 curve images
    # Bookkeeping (utils.Training): the objects named below are restored from checkpoint_last.pt
    # if an earlier run was interrupted, and saved there after each epoch. The loop is the algorithm.
    training = utils.Training(run, args.out, utils.run_config(args, ignore=AFTER_TRAINING),
                              args.fresh, args.epochs,
                              utils.steps_per_epoch(len(train_x), args.batch_size),
                              "latent optimization", series=SERIES, decoder=decoder, latents=latents,
                              opt_decoder=opt_decoder, opt_latents=opt_latents)
    out = training.out
    for epoch in training:
        train = train_epoch(decoder, latents, [opt_decoder, opt_latents], train_x, args.batch_size,
                            training.progress)
        table_mu = latents.mu.weight.detach()
        training.log(**{f"train_{k}": v for k, v in train.items()}, train_recon_mse=(
            vae_model.reconstruction_mse(decoder, table_mu[monitor], train_x[monitor])))
        if epoch in snapshots:       # the decoder and its latent table: reconstructions need both
            vae_model.save_snapshot(out / f"decoder_epoch{epoch}.pt", decoder, epoch,
                                    args.latent_dim, "vae_latent_opt", **latents.state_as_tensors())
    history = training.history
    vae_model.save_snapshot(out / "decoder_final.pt", decoder, args.epochs, args.latent_dim,
                            "vae_latent_opt")
    decoder.eval()
    final_train = vae_model.vae_evaluate(decoder, latents, train_x)
    table_mu, table_logvar = latents.mu.weight.detach(), latents.logvar.weight.detach()

    rows_train, rows_val, val_fit, same, same_images = fits_to_frozen_decoders(
        out, snapshots, decoder, (table_mu, table_logvar), amortized, data, args.compare_per_digit,
        functools.partial(fit_latents, steps=args.fit_steps, lr=args.fit_lr, init_seed=args.seed))
    prior_rows, amortized_val10 = beside_q1_and_q2(amortized, decoder, rows_train, rows_val, args.seed)
    plot_figures(out, snapshots, history, rows_train, rows_val, prior_rows, amortized is not None)

    control_args = (train_x, args.latent_dim, args.epochs, args.batch_size, args.lr,
                    args.latent_lr, args.seed, device)
    metrics = {
        **history, "snapshot_epochs": snapshots, "final_train": final_train,
        "val_fit_recon_mse": val_fit, "amortized_val10_recon_mse": amortized_val10,
        "same_budget": same, "same_budget_images": {**same_images, "steps": args.fit_steps},
        **prior_question(decoder, amortized, classifier, table_mu, table_logvar, train_x,
                         data["val_x"], data["train_y"]),
        "wide_start": wide_start_control(*control_args),
        "unit_sigma_start": unit_sigma_control(*control_args),
        # Q3's start again: LatentTable draws it by init_latents from the same seed (a resumed
        # run has no copy of it)
        "narrow_from_start": narrow_from_start(
            init_latents(len(train_x), args.latent_dim, args.seed)[1], table_logvar),
        "train_seconds": sum(history["epoch_seconds"]), "train_images": len(train_x),
        "latent_dim": args.latent_dim, **utils.run_facts(run, device, args),
    }
    metrics["verdicts"] = q3_verdicts(same, metrics["sample_quality"], metrics["aggregate_posterior_kl"],
                                      args.latent_dim, metrics["aggregate_posterior"],
                                      metrics["grey_share"], metrics["prior_vs_aggregate"],
                                      metrics.get("amortized_prior_vs_aggregate"),
                                      metrics["wide_start"], metrics["prior_outside"],
                                      metrics.get("amortized_prior_outside"))
    metrics["verdicts"].update(unit_sigma_verdicts(metrics["unit_sigma_start"],
                                                   metrics["prior_vs_aggregate"],
                                                   metrics.get("amortized_prior_outside")))
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"final training loss {history['train_loss'][-1]:.4f}; "
          f"{metrics['train_seconds']:.1f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
