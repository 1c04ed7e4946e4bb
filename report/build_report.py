"""Build both reports from outputs/: ex1_report.pdf (HUJI Exercise 1, at most 5 pages) and
apml_lab_report.pdf (Uppsala lab, 3.1 to 3.5 and 4.1 to 4.10).

Every number and every "which one" is read from the scripts' metrics.json (or computed here from
their checkpoints) at build time; where an explanation depends on the outcome, the text branches
on the measured outcome, so a different run still gets a true report.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as vae_model  # noqa: E402
import utils  # noqa: E402
from report.pdfdoc import Document  # noqa: E402

SCRIPTS = ["sup_classification", "vae_amortized", "vae_latent_opt", "log_likelihood", "ppca_pca"]
PRIOR_SAMPLES = 1000


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def load_metrics(outputs: Path, run_missing: bool, quick: bool, device: str) -> dict:
    missing = [s for s in SCRIPTS if not (outputs / s / "metrics.json").is_file()]
    if missing and run_missing:
        for script in missing:   # in dependency order: SCRIPTS is ordered
            extra = {"vae_latent_opt": ["--amortized", outputs / "vae_amortized" / "vae_final.pt"],
                     "log_likelihood": ["--checkpoint",
                                        outputs / "vae_amortized" / "vae_final.pt"]}.get(script, [])
            cmd = [sys.executable, str(utils.ROOT / f"{script}.py"), "--out", str(outputs / script),
                   "--device", device, *(["--quick"] if quick else []), *map(str, extra)]
            print("running", " ".join(cmd[1:]))
            if subprocess.run(cmd).returncode != 0:
                raise utils.UsageError(f"{script}.py failed; see its message above")
        missing = []
    if missing:
        raise utils.UsageError(f"missing outputs in {outputs}: run "
                               + ", then ".join(f"{s}.py" for s in missing)
                               + " first (or pass --run-missing)")
    return {s: utils.read_metrics(outputs / s / "metrics.json") for s in SCRIPTS}


@torch.no_grad()
def sample_quality(outputs: Path, m: dict, device) -> dict:
    """Judge prior samples with our Part 1 classifier: class histogram, its entropy, how many
    digits the samples cover, and the classifier's mean confidence, for the amortized generator
    at each snapshot epoch (Q2), the latent-optimization generator (Q3), and real test images
    as the reference."""
    from sup_classification import build_classifier
    from vae_amortized import load_snapshot

    classifier = build_classifier().to(device).eval()
    path = outputs / "sup_classification" / "classifier.pt"
    utils.load_state_dict_checked(classifier, utils.load_checkpoint(path, device), path)
    d = m["vae_amortized"]["latent_dim"]
    z = vae_model.prior_latents(PRIOR_SAMPLES, d, seed=12345).to(device)

    def stats(images):
        probs = torch.softmax(classifier(images), dim=1)
        share = torch.bincount(probs.argmax(1), minlength=10).double() / len(images)
        nz = share[share > 0]
        return {"share": share.tolist(), "entropy_bits": float(-(nz * nz.log2()).sum()) + 0.0,
                "digits_covered": int((share >= 0.02).sum()),
                "mean_confidence": float(probs.max(1).values.mean())}

    result = {}
    amortized = vae_model.VAE(d).to(device).eval()
    for epoch in m["vae_amortized"]["snapshot_epochs"]:
        load_snapshot(outputs / "vae_amortized" / f"vae_epoch{epoch}.pt", amortized,
                      "vae_amortized", device)
        result[f"amortized epoch {epoch}"] = stats(amortized.decoder(z))
    decoder = vae_model.Decoder(m["vae_latent_opt"]["latent_dim"]).to(device).eval()
    load_snapshot(outputs / "vae_latent_opt" / "decoder_final.pt", decoder, "vae_latent_opt", device)
    result["latent optimization (final)"] = stats(decoder(z[:, :decoder.latent_dim]))
    _, _, test_x, _ = utils.mnist_tensors("pm1")
    result["real test images"] = stats(test_x[:PRIOR_SAMPLES].to(device))
    return result


@torch.no_grad()
def aggregate_posterior_kl(outputs: Path, m: dict, device) -> dict:
    """How far the distribution of latents each decoder was trained on is from the prior it is
    sampled with. The aggregate posterior (1/N) sum_i N(mu_i, diag sigma_i^2) over the training
    images is moment-matched to a Gaussian N(m, S), S = Cov(mu_i) + mean diag(sigma_i^2), and
    KL(N(m, S) || N(0, I)) = (tr S + |m|^2 - d - log det S) / 2 is reported, in nats, for latent
    optimization (its learned tables) and the amortized encoder (mu(x_i), sigma(x_i))."""
    from vae_amortized import load_snapshot, vae_data

    lo, a = m["vae_latent_opt"], m["vae_amortized"]
    table = utils.load_checkpoint(outputs / "vae_latent_opt" /
                                  f"decoder_epoch{lo['snapshot_epochs'][-1]}.pt")
    vae = vae_model.VAE(a["latent_dim"]).to(device).eval()
    load_snapshot(outputs / "vae_amortized" / "vae_final.pt", vae, "vae_amortized", device)
    a_mu, a_logvar = vae.encoder(vae_data(a["args"]["quick"], device)["train_x"])

    def kl(mu, logvar):
        mu, logvar = mu.double().cpu(), logvar.double().cpu()
        cov = torch.cov(mu.T) + torch.diag(logvar.exp().mean(0))
        mean = mu.mean(0)
        return 0.5 * (torch.trace(cov) + mean @ mean - len(mean) - torch.logdet(cov)).item()

    return {"latent_opt": kl(table["mu"], table["logvar"]), "amortized": kl(a_mu, a_logvar)}


def plot_sample_quality(path: Path, quality: dict):
    plt = utils.pyplot()
    names = list(quality)
    shares = np.array([quality[n]["share"] for n in names])
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.1))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=max(0.3, shares.max()), aspect="auto")
    for i, name in enumerate(names):
        for j in range(10):
            ax.text(j, i, f"{shares[i, j]:.0%}", ha="center", va="center", fontsize=6.5)
        q = quality[name]
        ax.text(10.6, i, f"H={q['entropy_bits']:.2f} bits, conf={q['mean_confidence']:.2f}",
                va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks(range(10), range(10), fontsize=7)
    ax.set_xlim(-0.5, 14.5)
    ax.set_xlabel("digit predicted by the Part 1 classifier")
    ax.set_title(f"{PRIOR_SAMPLES} prior samples per generator, classified", fontsize=9)
    fig.tight_layout()
    utils.save_figure(fig, path)


def ink_vs_log_px(m: dict) -> dict:
    """Ink (pixels > 0) of each Q4 image, its correlation with log p(x), and ink per digit."""
    train, test = utils.load_mnist()
    images = m["log_likelihood"]["images"]
    ink = np.array([int(((train if im["split"] == "train" else test).data[im["index"]] > 0).sum())
                    for im in images])
    log_px = np.array([im["log_px"] for im in images])
    digits = np.array([im["digit"] for im in images])
    per_digit = {d: float(ink[digits == d].mean()) for d in range(10)}
    return {"corr": float(np.corrcoef(ink, log_px)[0, 1]), "per_digit": per_digit,
            "least_ink_digit": min(per_digit, key=per_digit.get)}


# ----------------------------------------------------------------------------------------------
# Helpers for the text
# ----------------------------------------------------------------------------------------------
def ranked(per_digit: dict, reverse=False):
    return sorted(per_digit, key=lambda d: per_digit[d], reverse=reverse)


def digits_text(ds):
    ds = [str(d) for d in ds]
    return ", ".join(ds[:-1]) + " and " + ds[-1] if len(ds) > 1 else ds[0]


def pct(x):
    return f"{100 * x:.2f} %"


# ----------------------------------------------------------------------------------------------
# HUJI Exercise 1
# ----------------------------------------------------------------------------------------------
def ex1_report(m: dict, quality: dict, agg_kl: dict, ink: dict, outputs: Path,
               path: Path) -> Document:
    c, a, lo, ll = (m[s] for s in SCRIPTS[:4])
    quick = c["args"]["quick"]
    doc = Document(path, "Exercise 1: PyTorch & Variational Inference (67912)",
                   "Generated by report/build_report.py from outputs/; every number below is read "
                   "from the scripts' metrics at build time." + ("  QUICK SMOKE RUN: numbers are "
                                                                  "not meaningful." if quick else ""))

    # Part 1 ----------------------------------------------------------------------------------
    acc = c["test_accuracy"]
    best = int(np.argmax(c["val_accuracy"])) + 1
    doc.heading("Part 1: supervised classification")
    doc.para(
        f"A small BatchNorm CNN ({c['parameters']:,} parameters) trained for {c['args']['epochs']} "
        f"epochs on the balanced {c['train_images']:,}-image subset ({c['train_images'] // 10:,} per "
        f"digit), with "
        f"batched random rotations/scalings/shifts, label smoothing 0.1 and AdamW under a "
        f"one-cycle schedule (peak lr {c['args']['lr']:g}, batch {c['args']['batch_size']}). "
        f"After every epoch we compute the average loss and accuracy on the {c['val_images']:,} "
        f"validation (official test) images. Final accuracy: {pct(acc)} "
        f"({'above' if acc >= 0.97 else 'BELOW'} the required 97 %; best {pct(max(c['val_accuracy']))}"
        f" at epoch {best}), in {c['train_seconds']:.0f} s of training on {c['device']}. "
        f"The validation loss is a plain cross-entropy; it stays above zero partly because "
        f"label smoothing trains the network to be less than fully confident.")
    doc.images([outputs / "sup_classification" / "val_curves.png"], width=0.78)

    # Q1 ----------------------------------------------------------------------------------------
    doc.heading("Q1: amortized VAE")
    tr, va = a["final_train"]["recon_mse"], a["final_val"]["recon_mse"]
    gap = (va - tr) / tr
    vmin_epoch = int(np.argmin(a["val_loss"])) + 1
    rising = a["val_loss"][-1] > min(a["val_loss"]) * 1.01
    doc.para(
        f"Encoder and decoder as in the course's model.py, d = {a['latent_dim']}, Adam "
        f"lr {a['args']['lr']:g}, {a['args']['epochs']} epochs on {a['train_images']:,} balanced "
        f"images, a fresh eps per image per step. Loss = pixel-mean MSE + dimension-mean KL "
        f"(Sec. 3.2), with the correct KL (see the note on Eq. 7). Reconstructions decode the mean "
        f"of q (z = mu(x)), so they show the model, not sampling noise. Curves per epoch are measured "
        f"on fixed balanced sets of {a['monitor_images']['train']:,} training and "
        f"{a['monitor_images']['val']:,} validation images; after the last epoch, on all of them: "
        f"loss {a['final_train']['loss']:.4f} (train) vs {a['final_val']['loss']:.4f} "
        f"(validation).")
    doc.images([outputs / "vae_amortized" / "loss_curves.png"], width=1.0)
    doc.images([outputs / "vae_amortized" / "q1_reconstructions_val.png",
                outputs / "vae_amortized" / "q1_reconstructions_train.png"], width=1.0,
               caption="Left: 10 validation images (one per digit, top row) and their "
                       "reconstructions G(mu(x)) at each epoch. Right: the same for 10 training "
                       "images.")
    why_little = (f"Why so little: the KL term keeps each q close to the prior and blurs what the "
                  f"decoder can memorize, the bottleneck forces it to model shared structure "
                  f"(strokes, digit shapes) rather than individual images, and "
                  f"{a['args']['epochs']} epochs over {a['train_images']:,} images is a modest "
                  f"amount of fitting.")
    if rising:
        verdict = (f"Yes, it starts to overfit: the validation loss is lowest at epoch {vmin_epoch} "
                   f"and {100 * (a['val_loss'][-1] / min(a['val_loss']) - 1):.1f} % higher by the "
                   f"end, while the training loss keeps falling: with only "
                   f"{a['train_images']:,} images the decoder starts to fit individual training "
                   f"images rather than what digits have in common.")
    elif gap < 0.05:
        verdict = ("No: the validation loss still falls or is flat at the end, and the "
                   "reconstruction error is nearly the same on unseen images, as the figures show. "
                   + why_little)
    else:
        verdict = ("Only mildly: the model reconstructs its own training images somewhat better "
                   "than unseen ones (a generalization gap), but the validation loss did not "
                   "increase, so it has not overfit in the sense of getting worse on new data. "
                   + why_little)
    doc.para(
        f"Did it overfit? Reconstruction MSE with the mean of q after the last epoch: "
        f"{tr:.4f} on the training images vs {va:.4f} on the validation images "
        f"({100 * gap:+.1f} %); lowest validation loss at epoch {vmin_epoch}. {verdict}")

    # Q2 ----------------------------------------------------------------------------------------
    doc.heading("Q2: sampling from the prior")
    doc.images([outputs / "vae_amortized" / "q2_prior_samples.png"], width=0.62,
               caption="The same 10 latents z ~ N(0, I) decoded by the generator of each epoch.")
    first, last = (quality[f"amortized epoch {e}"] for e in (a["snapshot_epochs"][0],
                                                             a["snapshot_epochs"][-1]))
    doc.para(
        f"How the generator changed, measured (no explanation is required): our Part 1 classifier "
        f"labels {PRIOR_SAMPLES} prior samples per epoch (figure below). From epoch "
        f"{a['snapshot_epochs'][0]} to {a['snapshot_epochs'][-1]} its mean confidence goes "
        f"{first['mean_confidence']:.2f} -> {last['mean_confidence']:.2f} (real test images: "
        f"{quality['real test images']['mean_confidence']:.2f}) and the samples cover "
        f"{first['digits_covered']} -> {last['digits_covered']} digits (>= 2 % each; class entropy "
        f"{first['entropy_bits']:.2f} -> {last['entropy_bits']:.2f} bits of a possible 3.32).")

    # Q3 ----------------------------------------------------------------------------------------
    doc.heading("Q3: latent optimization")
    fit = lo["val_fit_recon_mse"][str(lo["snapshot_epochs"][-1])]
    amort10 = lo.get("amortized_val10_recon_mse")
    doc.para(
        f"Decoder only, plus one (mu_i, r_i) per training image stored in tables indexed by the "
        f"image's position in the subset (so shuffling cannot mix them up), initialized mu ~ N(0, I)"
        f", sigma ~ N(0, I); Adam lr {lo['args']['lr']:g} for the decoder and sparse Adam lr "
        f"{lo['args']['latent_lr']:g} for the latents (each row is updated only when its image is "
        f"in the batch, i.e. once per epoch). Validation images have no latents of their own, so "
        f"for them we fit (mu, r) with the decoder frozen: {lo['args']['fit_steps']} Adam steps, "
        f"lr {lo['args']['fit_lr']:g}, same loss.")
    doc.images([outputs / "vae_latent_opt" / "loss_curves.png"], width=0.8)
    doc.images([outputs / "vae_latent_opt" / "q3_reconstructions_val.png",
                outputs / "vae_latent_opt" / "q3_reconstructions_train.png"], width=1.0,
               caption="Left: validation images, latents fitted with each epoch's decoder frozen; "
                       "the last row is Q1's amortized VAE on the same images. Right: training "
                       "images decoded from their learned mu_i.")
    a_train, lo_train = a["final_train"]["recon_mse"], lo["final_train"]["recon_mse"]
    better = "amortized" if a_train < lo_train else "latent optimization"
    cmp_val = ("" if amort10 is None else
               f" On the 10 validation images: {fit:.4f} (latents fitted to the frozen decoder) vs "
               f"{amort10:.4f} (amortized encoder).")
    if better == "amortized":
        why = (f"The encoder is a single network updated at every one of the "
               f"{a['args']['epochs'] * -(-a['train_images'] // a['args']['batch_size']):,} steps, and "
               "what it learns from one image improves the q of all similar images; each "
               f"optimized latent, in contrast, receives one gradient step per epoch "
               f"({lo['args']['epochs']} in all) from a random start, so at the end most latents "
               f"are still far from their optimum.")
    else:
        why = ("Each latent is optimized for its own image with no amortization gap (the encoder "
               "must serve all images with one network); given enough updates this fits the "
               "training images better, though it gives no q for new images without an extra "
               "optimization.")
    doc.para(
        f"Which method proposed better q vectors? The {better} one: reconstruction MSE with the "
        f"mean of q on the training images is {a_train:.4f} (amortized) vs {lo_train:.4f} (latent "
        f"optimization), losses {a['final_train']['loss']:.4f} vs {lo['final_train']['loss']:.4f}."
        f"{cmp_val} {why}")
    lo_q = quality["latent optimization (final)"]
    doc.images([outputs / "vae_latent_opt" / "q3_prior_samples.png"], width=0.62,
               caption="The same 10 prior latents through Q2's final amortized generator (top) and "
                       "the latent-optimization generator (bottom).")
    good_prior = lo_q["mean_confidence"] >= last["mean_confidence"] - 0.05 and \
        lo_q["digits_covered"] >= last["digits_covered"] - 1
    norm_ratio = lo["latent_mu_mean_norm"] / lo["expected_prior_norm"]
    doc.para(
        "Was the initialization sufficient for a good prior? "
        + ("Largely yes by our measures" if good_prior else "No") +
        f": the classifier's mean confidence on {PRIOR_SAMPLES} prior samples is "
        f"{lo_q['mean_confidence']:.2f} for this generator vs {last['mean_confidence']:.2f} for "
        f"the amortized one, covering {lo_q['digits_covered']} vs {last['digits_covered']} digits. "
        f"Initializing q_i at N(0, I) only places the latents where the prior is at the start; "
        f"nothing afterwards ties the set of learned latents to N(0, I) except each image's own "
        f"KL term, which is weak next to the reconstruction term. After training the mean "
        f"|mu_i| is {lo['latent_mu_mean_norm']:.1f} ({norm_ratio:.2f} x the sqrt(d) = "
        f"{lo['expected_prior_norm']:.1f} of a prior draw) and the mean sigma_i^2 is "
        f"{lo['latent_sigma2_mean']:.2f}. The decoder is trained on z drawn from the learned "
        f"q_i, i.e. from their mixture (the aggregate posterior); moment-matched to a Gaussian, "
        f"that mixture is {agg_kl['latent_opt']:.1f} nats away from N(0, I) (KL) for latent "
        f"optimization against {agg_kl['amortized']:.1f} for the amortized encoder. "
        + ("So a prior draw mostly lands where this decoder saw few training latents, and "
           "its samples are worse and less diverse than the amortized VAE's."
           if agg_kl["latent_opt"] > agg_kl["amortized"] else
           "By this measure the latent-optimization latents match the prior at least as well, so "
           "the difference in samples comes from the decoder itself."))

    # Q4 ----------------------------------------------------------------------------------------
    doc.heading("Q4: log-probability of an image (Eq. 9)")
    most, least = ll["most_likely_digit"], ll["least_likely_digit"]
    # Eq. 5 with means: |x - G|^2 / 784 + KL / d  ~  |x - G|^2 + (784 / d) KL, the ELBO's
    # |x - G|^2 / (2 sigma^2) + KL scaled by 2 sigma^2: so 2 sigma^2 = 784 / d.
    implied_sigma2 = 784 / a["latent_dim"] / 2
    conv = ll["convergence"]
    at = conv["M"].index(ll["num_samples"]) if ll["num_samples"] in conv["M"] else -1
    conv_shift = [img["log_px"][-1] - img["log_px"][at] for img in conv["images"]]
    doc.para(
        f"log p(x) = logsumexp_i[log p(z_i) + log p(x|z_i) - log q(z_i|x)] - log M with "
        f"M = {ll['num_samples']} samples z_i ~ q(z|x) from the final amortized encoder, "
        f"p(x|z) = N(G(z), {ll['sigma_p']}^2 I) over all 784 pixels in [-1, 1], every density in "
        f"log space. The estimator is verified in the tests against the exact log p(x) of a "
        f"linear-Gaussian model. 100 images took {ll['estimate_seconds']:.1f} s on "
        f"{ll['device']}. Delta-method standard errors are at most {ll['max_mc_stderr']:.2f} nats, "
        f"but they understate the error: the effective sample size of the importance weights is "
        f"only {ll['median_ess']:.1f} of {ll['num_samples']:,} (median; minimum "
        f"{ll['min_ess']:.1f}), the estimate lies on average "
        f"{ll['mean_gap_log_px_minus_elbo']:.1f} nats above the ELBO and, for the three images on "
        f"the right, still moves by {', '.join(f'{d:+.1f}' for d in conv_shift)} nats from "
        f"M = {ll['num_samples']:,} to {ll['convergence']['M'][-1]:,}. The reason is the "
        f"exercise's loss: pixel-mean MSE + dimension-mean KL is, up to scale, the ELBO of a "
        f"decoder with sigma^2 = {implied_sigma2:.2f} (sigma = {implied_sigma2 ** 0.5:.2f}), "
        f"not {ll['sigma_p']}, so the encoder's q is much wider than the posterior of the "
        f"sigma_p = {ll['sigma_p']} model and the importance weights are heavy-tailed. "
        f"Eq. 9 is a lower bound in expectation that tightens as M grows; all comparisons below "
        f"use the same M for every image.")
    doc.images([outputs / "log_likelihood" / "q4_log_px_examples.png"], width=0.9,
               caption="(a) One training and one test image per digit, with log p(x) in nats.")
    doc.images([outputs / "log_likelihood" / "q4_log_px_per_digit.png",
                outputs / "log_likelihood" / "q4_convergence.png"], width=1.0,
               caption=f"(b) Mean log p(x) per digit ({ll['args']['per_digit']} training + "
                       f"{ll['args']['per_digit']} test images each). Right: the estimate against M"
                       f" for three images (prefixes of one stream of "
                       f"{ll['convergence']['M'][-1]:,} samples) with the ELBO (dashed).")
    rows = [["digit"] + [str(d) for d in range(10)],
            ["mean log p(x)"] + [f"{ll['per_digit'][str(d)]['mean']:.0f}" for d in range(10)],
            ["s.e."] + [f"{ll['per_digit'][str(d)]['se']:.0f}" for d in range(10)],
            ["ink pixels"] + [f"{ink['per_digit'][d]:.0f}" for d in range(10)]]
    doc.table(rows)
    means_by_digit = {d: ll["per_digit"][d]["mean"] for d in ll["per_digit"]}
    ink_text = (f"digit {most} is also the one with the least ink in our sample "
                f"({ink['per_digit'][most]:.0f} lit pixels on average)"
                if ink["least_ink_digit"] == most else
                f"the digit with the least ink is {ink['least_ink_digit']}, close behind")
    doc.para(
        f"(b) The most likely digit is {most} (mean {ll['per_digit'][str(most)]['mean']:.0f} nats), "
        f"the least likely {least} ({ll['per_digit'][str(least)]['mean']:.0f}). Why: log p(x) "
        f"under a Gaussian decoder is a sum over all 784 pixels of how well each is predicted. "
        f"Background pixels are exactly -1 and predicted almost perfectly; stroke pixels vary "
        f"with position, slant and thickness and each costs nats. An image with few and "
        f"predictable strokes is therefore likely: across the 100 images, log p(x) and the number "
        f"of lit pixels correlate at r = {ink['corr']:.2f}, and {ink_text}."
        + (" A 1 is essentially one line whose main variation (slant) the latent captures "
           f"easily; the least likely digits here, {digits_text(ranked(means_by_digit)[:3])}, are "
           f"drawn with longer strokes that vary more from writer to writer." if most == 1 else ""))
    z_diff = ll["train_minus_test"] / ll["train_minus_test_se"]
    if abs(z_diff) < 2:
        verdict = ("Neither: the difference is within two standard errors, so at this sample "
                   "size the training images are not measurably more likely")
    elif z_diff > 0:
        verdict = ("More likely: the model has fitted the images it was trained on somewhat "
                   "better than new ones, the same small generalization gap as in Q1")
    else:
        verdict = ("Less likely, surprisingly: the difference is larger than two standard errors; "
                   f"with {ll['args']['per_digit'] * 10} images per set this reflects which "
                   f"images were drawn more than the model")
    doc.para(
        f"(c) Average log p(x): training images {ll['train_mean']:.1f} +- {ll['train_se']:.1f}, "
        f"test images {ll['test_mean']:.1f} +- {ll['test_se']:.1f} (difference "
        f"{ll['train_minus_test']:+.1f} +- {ll['train_minus_test_se']:.1f}; paired by digit "
        f"{ll['paired_train_minus_test']:+.1f} +- {ll['paired_train_minus_test_se']:.1f}). "
        f"{verdict}. The spread between digits is much larger than between the two sets, which "
        f"is why comparing within digit matters.")

    # Eq. 7 and beyond ----------------------------------------------------------------------------
    doc.heading("Note on the exercise's Eq. 7, and sample quality")
    zero = torch.zeros(1, dtype=torch.float64)
    half = torch.tensor([math.log(0.5)], dtype=torch.float64)
    eq7_half = vae_model.kl_eq7_as_printed(zero, half).item()
    kl_half = vae_model.kl_std_normal(zero, half).item()
    doc.para(
        f"Eq. 7 prints KL = mu^2 + sigma^2 - log(sigma) - 1. The KL of N(mu, sigma^2) from N(0, 1) "
        f"is (mu^2 + sigma^2 - 1 - log sigma^2)/2; the printed form equals 2 KL + log sigma, which "
        f"is minimized at sigma^2 = 1/2 instead of 1 and is not even non-negative: at mu = 0, "
        f"sigma^2 = 1/2 it gives {eq7_half:.4f} while the true KL is {kl_half:.4f} (computed by "
        f"model.py; the tests check both forms against torch.distributions). We train with the "
        f"correct KL.")
    plot_sample_quality(path.parent / "sample_quality.png", quality)
    doc.images([path.parent / "sample_quality.png"], width=0.8)
    doc.heading("Use of AI tools", level=2)
    doc.para("This repository (scripts, tests, and this report's builder) was written with an AI "
             "coding assistant. Its output was checked the way the exercise demands of any code: "
             "densities against torch.distributions, the log-likelihood estimator against an exact "
             "linear-Gaussian answer, PPCA against scikit-learn; all figures and numbers come from "
             "runs of the code, none are typed by hand.")
    return doc.save()


# ----------------------------------------------------------------------------------------------
# Uppsala lab
# ----------------------------------------------------------------------------------------------
def apml_report(m: dict, outputs: Path, path: Path) -> Document:
    p = m["ppca_pca"]
    enc = p["encodings"]
    doc = Document(path, "Unsupervised learning with variational autoencoders (APML lab)",
                   f"PCA, probabilistic PCA and a VAE with a 2-D latent on MNIST ({p['train_images']:,}"
                   f" training, {p['test_images']:,} test images, pixels in [0, 1]). Generated by "
                   f"report/build_report.py from outputs/ppca_pca/metrics.json."
                   + ("  QUICK SMOKE RUN: numbers are not meaningful." if p["args"]["quick"] else ""))

    doc.heading("Preparatory exercises")
    doc.heading("3.1 Mapping an arbitrary x to the principal subspace", 2)
    doc.para("With X = U Sigma V^T, the principal directions are the first M columns of V, so a new "
             "(centred) vector is projected exactly like a training point. Because V = X^T U "
             "Sigma^-1 (for non-zero singular values), the same map can be written with U and "
             "Sigma:")
    doc.math([r"$\mathbf{z}^\top = \mathbf{x}^\top [\mathbf{v}_1 \cdots \mathbf{v}_M]"
              r" = \mathbf{x}^\top \mathbf{X}^\top [\mathbf{u}_1 \cdots \mathbf{u}_M]\,"
              r"\mathrm{diag}(\sigma_1^{-1}, \ldots, \sigma_M^{-1})$"])
    doc.heading("3.2 Data that is not centred", 2)
    doc.para("Centre with the training mean before projecting and add it back after decoding (for "
             "training points and for new x alike), and compute the SVD of the centred matrix "
             "X - 1 xbar^T:")
    doc.math([r"$\bar{\mathbf{x}} = \frac{1}{N}\sum_n \mathbf{x}_n,\quad "
              r"\mathbf{z}_n^\top = (\mathbf{x}_n - \bar{\mathbf{x}})^\top [\mathbf{v}_1 \cdots "
              r"\mathbf{v}_M],\quad \tilde{\mathbf{x}}_n^\top = \mathbf{z}_n^\top [\mathbf{v}_1 "
              r"\cdots \mathbf{v}_M]^\top + \bar{\mathbf{x}}^\top$"])
    doc.heading("3.3 The marginal of PPCA", 2)
    doc.para("Write x = W z + mu + eps with z ~ N(0, I_M) and eps ~ N(0, sigma^2 I_D) independent. "
             "x is an affine function of the jointly Gaussian (z, eps), hence Gaussian (Corollary 2 "
             "of Lecture 2), with")
    doc.math([r"$\mathbb{E}[\mathbf{x}] = \mathbf{W}\,\mathbb{E}[\mathbf{z}] + \boldsymbol{\mu} + "
              r"\mathbb{E}[\boldsymbol{\epsilon}] = \boldsymbol{\mu},\quad "
              r"\mathrm{Cov}[\mathbf{x}] = \mathbf{W}\,\mathbf{I}_M\mathbf{W}^\top + "
              r"\sigma^2\mathbf{I}_D = \mathbf{C}$",
              r"$\Rightarrow\ p(\mathbf{x}) = \mathcal{N}(\mathbf{x};\ \boldsymbol{\mu},\ "
              r"\mathbf{W}\mathbf{W}^\top + \sigma^2 \mathbf{I}_D).$"])
    doc.heading("3.4 The posterior of PPCA", 2)
    doc.para("By Bayes' rule p(z|x) is proportional to p(x|z) p(z); collecting the terms in z of "
             "the exponent (Corollary 1 of Lecture 2):")
    doc.math([r"$\log p(\mathbf{z}|\mathbf{x}) = -\frac{1}{2}\mathbf{z}^\top\mathbf{z} - "
              r"\frac{1}{2\sigma^2}\|\mathbf{x} - \mathbf{W}\mathbf{z} - \boldsymbol{\mu}\|^2 + "
              r"\mathrm{const} = -\frac{1}{2}\mathbf{z}^\top \frac{\mathbf{M}}{\sigma^2}\mathbf{z}"
              r" + \mathbf{z}^\top\frac{\mathbf{W}^\top(\mathbf{x}-\boldsymbol{\mu})}{\sigma^2}"
              r" + \mathrm{const}$",
              r"$\mathbf{M} = \mathbf{W}^\top\mathbf{W} + \sigma^2\mathbf{I}_M:\quad "
              r"\mathrm{precision} = \mathbf{M}/\sigma^2,\quad \mathrm{mean} = "
              r"(\mathbf{M}/\sigma^2)^{-1}\mathbf{W}^\top(\mathbf{x}-\boldsymbol{\mu})/\sigma^2$",
              r"$\Rightarrow\ p(\mathbf{z}|\mathbf{x}) = \mathcal{N}(\mathbf{z};\ \mathbf{M}^{-1}"
              r"\mathbf{W}^\top(\mathbf{x}-\boldsymbol{\mu}),\ \sigma^2\mathbf{M}^{-1}).$"])
    doc.heading("3.5 The KL term of the VAE", 2)
    doc.para("Both distributions factorize over the M dimensions, so the KL is a sum of 1-D terms; "
             "with q_i = N(mu_i, sigma_i^2) and E_q[(z_i - mu_i)^2] = sigma_i^2, E_q[z_i^2] = "
             "mu_i^2 + sigma_i^2:")
    doc.math([r"$\mathrm{KL}[q\,\|\,p] = \sum_i \mathbb{E}_{q}\left[\log q_i(z_i) - "
              r"\log \mathcal{N}(z_i; 0, 1)\right] = \sum_i \left[-\frac{1}{2}\log\sigma_i^2 - "
              r"\frac{1}{2} + \frac{1}{2}(\mu_i^2 + \sigma_i^2)\right]$",
              r"$= \frac{1}{2}\left(\sum_i \sigma_i^2 + \|\boldsymbol{\mu}\|_2^2 - M - "
              r"\sum_i \log \sigma_i^2\right).$"])

    doc.heading("Lab: PCA")
    pca, pg, pc, vae = p["pca"], p["ppca_gradient"], p["ppca_closed_form"], p["vae"]

    def best_worst(per):
        order = ranked(per)
        return order[:3], order[-3:][::-1]

    pb, pw = best_worst(pca["test_sq_error_per_digit"])
    doc.images([outputs / "ppca_pca" / "reconstructions.png", outputs / "ppca_pca" /
                "sq_error_per_digit.png"], width=1.0,
               caption="Left: the same test images and their reconstructions from 2 numbers by each "
                       "method. Right: squared reconstruction error per digit.")
    ink = p["test_ink_per_digit"]
    rel = {d: pca["test_sq_error_per_digit"][d] / ink[d] for d in ink}
    rb, rw = ranked(rel)[:3], ranked(rel)[-3:][::-1]
    ink_corr = float(np.corrcoef([ink[str(d)] for d in range(10)],
                                 [pca["test_sq_error_per_digit"][str(d)] for d in range(10)])[0, 1])
    doc.para(f"Q4.1: With 2 components PCA reconstructs digits {digits_text(pb)} best (lowest "
             f"squared error) and {digits_text(pw)} worst. Part of this ranking is ink: the error "
             f"is a sum over pixels, and across digits it correlates at r = {ink_corr:.2f} with a "
             f"digit's mean sum of squared pixels (digit 1: {ink['1']:.0f}, digit 0: "
             f"{ink['0']:.0f}). Relative to its own ink, a digit is reconstructed best if it "
             f"resembles what the two principal directions describe (mostly the contrast between "
             f"a 1-like vertical stroke and a 0-like ring): relative error is lowest for "
             f"{digits_text(rb)} and highest for {digits_text(rw)}, whose shapes the plane cannot "
             f"express and which come out as blurred averages.")
    doc.para(f"Q4.2: Average squared reconstruction error of PCA on the test set (sum over "
             f"pixels, mean over images): {pca['test_sq_error']:.2f}. The two components explain "
             f"{pct(pca['explained_variance'])} of the training variance.")

    doc.heading("Lab: probabilistic PCA")
    angles = p["ppca_comparison"]["subspace_angles_deg"]
    doc.para(f"Q4.3: Initialization: {pg['initialization']}. Trained by Adam (lr {pg['lr']:g}) on "
             f"mini-batches of {pg['batch_size']} for {pg['epochs']} epochs = {pg['iterations']:,} "
             f"iterations, maximizing the exact log-likelihood computed through the 2x2 matrix M "
             f"(Woodbury identity and determinant lemma). Against the closed-form maximum-"
             f"likelihood solution: test log-likelihood {pg['test_log_likelihood']:.2f} vs "
             f"{pc['test_log_likelihood']:.2f} nats per image, sigma^2 {pg['sigma2']:.5f} vs "
             f"{pc['sigma2']:.5f}, angles between the two 2-D subspaces {angles[0]:.2f} and "
             f"{angles[1]:.2f} degrees.")
    doc.images([outputs / "ppca_pca" / "ppca_log_likelihood.png"], width=0.85)
    doc.images([outputs / "ppca_pca" / "encodings.png"], width=1.0,
               caption="Encodings of the test set (PCA projection, PPCA posterior mean, VAE mean "
                       "of q), coloured by digit; the numbers mark each digit's mean encoding.")
    rng = {k: (enc[k]["range_min"], enc[k]["range_max"], enc[k]["std"]) for k in enc}

    def range_text(k):
        lo_, hi_, sd = rng[k]
        return (f"[{lo_[0]:.2f}, {hi_[0]:.2f}] x [{lo_[1]:.2f}, {hi_[1]:.2f}] (std {sd[0]:.2f}, "
                f"{sd[1]:.2f})")

    doc.para(f"Q4.4: PCA encodings span {range_text('pca')}; PPCA encodings span "
             f"{range_text('ppca')}. The shapes agree (up to a rotation and reflection, which the "
             f"PPCA likelihood cannot identify) but the scales differ: PCA coordinates have the "
             f"variance of the data along each principal direction (the eigenvalues lambda_i), "
             f"whereas the PPCA posterior mean M^-1 W^T (x - mu), with W = U (Lambda - sigma^2 I)^1/2"
             f" R, equals R^T (Lambda - sigma^2 I)^1/2 Lambda^-1 times the PCA coordinates: each "
             f"axis is shrunk by about 1/sqrt(lambda_i), which brings the codes to roughly unit "
             f"variance, as the prior N(0, I) demands.")
    gb, gw = best_worst(pg["test_sq_error_per_digit"])
    same = set(gb) == set(pb) and set(gw) == set(pw)
    doc.para(f"Q4.5: PPCA reconstructs digits {digits_text(gb)} best and {digits_text(gw)} worst; "
             + ("the same digits as PCA" if same else "nearly the same ranking as PCA") +
             f", as expected: the closed-form PPCA spans the same principal subspace, and the "
             f"gradient fit lies within {max(angles):.2f} degrees of it.")
    doc.para(f"Q4.6: PPCA's test squared error is {pg['test_sq_error']:.2f} (closed form "
             f"{pc['test_sq_error']:.2f}) against {pca['test_sq_error']:.2f} for PCA. "
             + ("It is slightly larger because decoding the posterior mean W E[z|x] + mu does not "
                "undo the shrinkage of E[z|x] towards 0 by (lambda - sigma^2)/lambda: the "
                "reconstruction lies a little towards the mean image compared with the orthogonal "
                "projection, which is the best possible 2-D linear reconstruction."
                if pg["test_sq_error"] >= pca["test_sq_error"] else
                "It is no larger: in the limit sigma^2 -> 0 PPCA becomes PCA."))

    doc.heading("Lab: variational autoencoder")

    def pairs_text(k):
        return ", ".join(f"{pp['digits'][0]}-{pp['digits'][1]}" for pp in enc[k]["closest_pairs"][:3])

    def crowding(k):
        """Distance from each digit's mean encoding to the nearest other digit's mean."""
        means = torch.tensor([enc[k]["mean_encoding"][str(d)] for d in range(10)])
        dist = torch.cdist(means, means).fill_diagonal_(float("inf"))
        return {str(d): dist[d].min().item() for d in range(10)}

    crowd = crowding("pca")
    shared = len({tuple(pp["digits"]) for pp in enc["pca"]["closest_pairs"][:3]}
                 & {tuple(pp["digits"]) for pp in enc["ppca"]["closest_pairs"][:3]})
    near_worst = np.mean([crowd[d] for d in pw])
    near_best = np.mean([crowd[d] for d in pb])
    doc.para(f"Q4.7: The closest mean encodings (Euclidean distance between digit means) are "
             f"{pairs_text('pca')} for PCA and {pairs_text('ppca')} for PPCA ({shared} of the "
             f"three pairs shared: PPCA's codes are PCA's rotated and rescaled per axis, and the "
             f"rescaling changes which distances are smallest). Compared with "
             f"Q4.1/4.5: the worst-reconstructed digits ({digits_text(pw)}) have their PCA mean "
             f"code at distance {near_worst:.2f} from the nearest other digit's on average, the "
             f"best-reconstructed ({digits_text(pb)}) at {near_best:.2f}. "
             + ("Crowded digits are the poorly reconstructed ones: when several digits share "
                "nearly the same 2-D code, the linear decoder can only return a blend of them."
                if near_worst < near_best else
                "So crowding in code space is not what makes a digit hard here; the hard digits "
                "are those whose shape is poorly described by the two dominant directions "
                "(a large residual off the principal plane)."))
    doc.para(f"The VAE uses model.py's convolutional encoder/decoder with d = 2 (encoder input 2x - 1,"
             f" decoder output mapped by (G + 1)/2), a learned observation variance (sigma^2 = "
             f"{vae['sigma2']:.4f} at the end), ELBO with the closed-form KL of 3.5, Adam lr "
             f"{p['args']['lr']:g}, batch {p['args']['batch_size']}, {vae['epochs']} epochs over "
             f"all training images; test ELBO {vae['test_elbo']:.1f} nats per image.")
    sep = {k: enc[k].get("separation") for k in enc}
    doc.para(f"Q4.8: VAE encodings span {range_text('vae')}: like PPCA they are on the prior's "
             f"scale (the KL pulls q towards N(0, I)), but the clusters are far better separated: "
             f"the ratio of between-digit to within-digit variance of the codes is "
             f"{sep['vae']:.2f} for the VAE against {sep['ppca']:.2f} for PPCA and {sep['pca']:.2f} "
             f"for PCA. A non-linear encoder can place each digit in its own region of the plane; "
             f"a linear map of 784 pixels to 2 numbers cannot.")
    vb, vw = best_worst(vae["test_sq_error_per_digit"])
    gain = {d: pg["test_sq_error_per_digit"][d] - vae["test_sq_error_per_digit"][d]
            for d in map(str, range(10))}
    improved = [d for d in gain if gain[d] > 0]
    doc.para(f"Q4.9: The VAE reconstructs digits {digits_text(vb)} best and {digits_text(vw)} worst"
             f" (PPCA: {digits_text(gb)} best, {digits_text(gw)} worst). It improves on PPCA for "
             f"{len(improved)} of 10 digits; the largest gains are for digits "
             f"{digits_text(ranked(gain, reverse=True)[:3])} (squared error down by "
             f"{', '.join(f'{gain[d]:.1f}' for d in ranked(gain, reverse=True)[:3])}), the "
             f"smallest for {digits_text(ranked(gain)[:2])}.")
    doc.para(f"Q4.10: The VAE's average test squared error is {vae['test_sq_error']:.2f} vs "
             f"{pg['test_sq_error']:.2f} for PPCA ({100 * (1 - vae['test_sq_error'] / pg['test_sq_error']):.0f}"
             f" % lower) and {pca['test_sq_error']:.2f} for PCA, with the same 2 numbers per image.")
    doc.images([outputs / "ppca_pca" / "lattice_ppca.png", outputs / "ppca_pca" / "lattice_vae.png"],
               width=0.95, caption="Decoded from a regular 15 x 15 lattice in latent space: PPCA "
                                   "(left) can only move linearly between two directions; the VAE "
                                   "(right) sweeps through recognisable digits.")
    doc.images([outputs / "ppca_pca" / "samples.png"], width=0.7,
               caption="Samples: means of p(x|z) for z ~ N(0, I).")
    return doc.save()


def parse_args(argv=None):
    parser = utils.OneLineParser(prog="build_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, default=utils.OUTPUTS_DIR,
                        help="folder holding the scripts' output folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the PDFs go (default: <outputs>/report)")
    parser.add_argument("--run-missing", action="store_true",
                        help="run the scripts whose outputs are missing first")
    parser.add_argument("--quick", action="store_true", help="with --run-missing: their --quick")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="device for classifying the VAE samples")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = utils.get_device(args.device)
    m = load_metrics(args.outputs, args.run_missing, args.quick, args.device)
    out = utils.prepare_out_dir(args.out or args.outputs / "report")
    quality = sample_quality(args.outputs, m, device)
    agg_kl = aggregate_posterior_kl(args.outputs, m, device)
    ink = ink_vs_log_px(m)
    utils.write_metrics(out / "report_numbers.json",
                        {"sample_quality": quality, "aggregate_posterior_kl": agg_kl, "ink": ink})
    ex1 = ex1_report(m, quality, agg_kl, ink, args.outputs, out / "ex1_report.pdf")
    lab = apml_report(m, args.outputs, out / "apml_lab_report.pdf")
    print(f"wrote {ex1.path} ({ex1.pages} pages) and {lab.path} ({lab.pages} pages)")
    return ex1, lab


if __name__ == "__main__":
    utils.run_main(main)
