"""HUJI 67912 Exercise 1, Part 2, Q1 and Q2: an amortized VAE on 5,000 balanced MNIST images.

Q1: loss per epoch (training and validation, with their MSE and KL parts), reconstructions of
10 validation and 10 training images (one per digit) at epochs 1, 5, 10, 20, 30, and the
train-vs-validation reconstruction error (each digit weighted equally, since the test set's
digit mix is not the balanced subset's) that says whether it overfit.
Q2: 10 latents drawn once from the prior, decoded by the generator of each of those epochs, and
1,000 prior samples per epoch judged by the Part 1 classifier (which digits, how confidently).
`--loss elbo` trains the same VAE on the negative ELBO of the sigma_p model instead (the
ablation that shows why Q4's Eq. 9 weights degenerate with the exercise's loss).
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import math

import torch

import model as vae_model
import utils


def parse_args(argv=None):
    parser = utils.script_parser("vae_amortized", __doc__.splitlines()[0])
    parser.add_quick_argument("--epochs", 30, 2, "training epochs", type=utils.int_in(1, 10_000))
    utils.add_vae_data_arguments(parser)
    parser.add_argument("--batch-size", type=utils.int_in(1, 8192), default=64,
                        help="batch size")
    parser.add_argument("--lr", type=utils.float_in(1e-8, 10), default=1e-3,
                        help="Adam learning rate")
    parser.add_argument("--latent-dim", type=utils.int_in(1, 1024), default=200,
                        help="latent size d")
    parser.add_argument("--loss", choices=["exercise", "elbo"], default="exercise",
                        help="exercise: Eq. 5 as Sec. 3.2 aggregates it (pixel-mean MSE + "
                             "dimension-mean KL); elbo: the negative ELBO of the sigma_p model")
    parser.add_argument("--sigma-p", type=utils.float_in(1e-3, 1e3), default=0.4,
                        help="std of p(x|z) = N(G(z), sigma_p^2 I): the --loss elbo objective "
                             "and Q4 use it")
    utils.add_file_argument(parser, "--classifier", utils.CLASSIFIER,
                            "Part 1's classifier.pt, to judge the prior samples")
    return parser.parse_args(argv)


def kl_eq7_as_printed(mu, logvar):
    """HUJI Eq. 7 exactly as printed, mu^2 + sigma^2 - log sigma - 1 (kept only as evidence that
    it is not the KL; never used for training)."""
    return mu.pow(2) + torch.exp(logvar) - 0.5 * logvar - 1.0


def eq7_check() -> dict:
    """Eq. 7 as printed against the true KL at mu = 0: their minimizers over sigma^2 on a grid,
    and both values at sigma^2 = 1/2 (where the printed form is negative)."""
    log_var = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    zero = torch.zeros_like(log_var)
    half = torch.tensor([math.log(0.5)], dtype=torch.float64)
    return {"kl_minimizer_sigma2": math.exp(log_var[vae_model.kl_std_normal(zero, log_var).argmin()]),
            "eq7_minimizer_sigma2": math.exp(log_var[kl_eq7_as_printed(zero, log_var).argmin()]),
            "eq7_at_half": kl_eq7_as_printed(zero[:1], half).item(),
            "kl_at_half": vae_model.kl_std_normal(zero[:1], half).item()}


def overfit_verdict(history, final) -> dict:
    """Q1's 'did it overfit?': 'yes' if the validation loss ends more than 1 % above its minimum,
    else 'no' if the reconstruction error on unseen images is within 5 % of the training
    images', else 'mildly' (a generalization gap without the validation loss rising). `final`
    holds each split's recon_mse (main passes them weighted to equal digit shares, so that both
    sets have the same digit mix). Also whether that gap is within two standard errors of the
    difference (no gap can be measured, where the standard errors are known) and how many
    standard errors it is, and whether the model is still improving: the validation loss fell
    over the last five epochs."""
    val = history["val_loss"]
    gap = (final["val"]["recon_mse"] - final["train"]["recon_mse"]) / final["train"]["recon_mse"]
    rise = val[-1] / min(val) - 1
    verdict = "yes" if rise > 0.01 else ("no" if gap < 0.05 else "mildly")
    # Still learning at the end? The validation loss's fall over the last five epochs.
    fall = (val[-6] - val[-1]) / val[-6] if len(val) > 5 else None
    seen, unseen = final["train"], final["val"]
    known = (unseen.get("recon_mse_se") is not None) and (seen.get("recon_mse_se") is not None)
    within = (utils.within_two_se(unseen["recon_mse"], seen["recon_mse"], unseen["recon_mse_se"],
                                  seen["recon_mse_se"]) if known else None)
    in_se = ((unseen["recon_mse"] - seen["recon_mse"])
             / math.hypot(unseen["recon_mse_se"], seen["recon_mse_se"]) if known else None)
    return {"verdict": verdict, "recon_gap": gap, "recon_gap_within_two_se": within,
            "recon_gap_in_se": in_se,
            "val_loss_rise": rise,
            "best_val_epoch": int(min(range(len(val)), key=val.__getitem__)) + 1,
            "val_loss_fall_last5": fall, "still_improving": fall is not None and fall > 0}


# The curves logged each epoch: train_epoch's running averages, then monitor_epoch's numbers
SERIES = ("train_loss", "train_mse", "train_kl", "val_loss", "val_mse", "val_kl",
          "val_recon_mse", "val_recon_mse_se", "train_recon_mse")


def train_epoch(vae, optimizer, x, batch_size, progress, **objective) -> dict:
    """One pass over the training images in shuffled batches: encode, sample z with a fresh eps
    per image (Sec. 3.1.4), decode, and one Adam step on the loss of Eq. 5. Returns the running
    averages of the loss and its two parts (the weights change while they are summed)."""
    sums = {"loss": 0.0, "mse": 0.0, "kl": 0.0}
    for idx in utils.batches(len(x), batch_size, shuffle=True, device=x.device):
        x_hat, mu, logvar = vae(x[idx])
        loss, mse, kl = vae_model.vae_loss(x[idx], x_hat, mu, logvar, **objective)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in zip(sums, (loss, mse, kl)):
            sums[key] += value.item() * len(idx)
        progress.update(1)
    return {key: value / len(x) for key, value in sums.items()}


def encode(vae):
    """The amortized posterior: q(z|x) from the encoder, whatever the image's index."""
    return lambda idx, xb: vae.encoder(xb)


def monitor_epoch(vae, monitor, objective) -> dict:
    """The validation loss and its parts, and both reconstruction errors, on the fixed
    monitoring images (Q1's curves)."""
    val = vae_model.vae_evaluate(vae.decoder, encode(vae), monitor["val"], **objective)
    with torch.no_grad():
        train_recon = vae_model.reconstruction_mse(vae.decoder, vae.encoder(monitor["train"])[0],
                                                   monitor["train"])
    return {**{f"val_{k}": v for k, v in val.items()}, "train_recon_mse": train_recon}


def plot_loss_curves(path, history, monitor, loss, sigma_p) -> None:
    loss_name = ("loss (Eq. 5: MSE + mean KL)" if loss == "exercise"
                 else f"negative ELBO, sigma_p = {sigma_p:g} [nats]")
    epochs = list(range(1, len(history["train_loss"]) + 1))
    # Two protocols, told apart in the legend (the caption says how): the training loss averaged
    # over the epoch's minibatches as it trains, and fixed images scored after the epoch (the
    # middle panel scores training and validation images alike).
    val = f"validation ({len(monitor['val']):,} images)"
    train, running = f"training ({len(monitor['train']):,} images)", "training (epoch average)"
    utils.plot_curves(path, {
        loss_name: {running: (epochs, history["train_loss"]), val: (epochs, history["val_loss"])},
        "reconstruction MSE (mean of q)": {train: (epochs, history["train_recon_mse"]),
                                           val: (epochs, history["val_recon_mse"])},
        "KL per latent dimension (nats)": {running: (epochs, history["train_kl"]),
                                           val: (epochs, history["val_kl"])},
    }, height=2.3, legend_loc="above", dashed=(val,))


def snapshot_figures(out, snapshots, latent_dim, show, z_show, classifier, device):
    """Q1's reconstructions and Q2's prior samples from every snapshot's generator (the same
    fixed images and the same prior latents for all), and Q2's sample quality: 1,000 prior
    samples per snapshot judged by Part 1's classifier (empty without it) and, needing no
    classifier, by their variety (`utils.variety_per_image`: mean, standard error). Returns
    (quality, variety), each by epoch."""
    z_judge = vae_model.prior_latents(utils.QUALITY_SAMPLES, latent_dim,
                                      utils.QUALITY_SEED).to(device)
    rows = {"val": [show["val"]], "train": [show["train"]], "prior": []}
    quality, variety = {}, {}
    snapshot = vae_model.VAE(latent_dim).to(device).eval()
    for epoch in snapshots:
        vae_model.load_snapshot(out / f"vae_epoch{epoch}.pt", snapshot, "vae_amortized", device,
                                vae_model.OWN_SNAPSHOT)
        rows["val"].append(snapshot.reconstruct(show["val"]))
        rows["train"].append(snapshot.reconstruct(show["train"]))
        with torch.no_grad():
            rows["prior"].append(snapshot.decoder(z_show))
            samples = snapshot.decoder(z_judge)
            variety[str(epoch)] = utils.mean_and_se(utils.variety_per_image(samples))
            if classifier is not None:
                quality[str(epoch)] = utils.classify_samples(classifier, samples)
    labels = [f"epoch {e}" for e in snapshots]
    for split in ("val", "train"):
        utils.plot_image_rows(out / f"q1_reconstructions_{split}.png", rows[split],
                              ["original"] + labels, col_labels=list(range(10)))
    utils.plot_image_rows(out / "q2_prior_samples.png", rows["prior"], labels)
    return quality, variety


def baseline_images(train_x, val_x, seed: int) -> dict:
    """Images that are no digits, against which Q2's measures of its samples are read:
    Gaussian noise (clipped to the pixel range), the mean training image (the blurriest
    possible "sample") and real test images blurred by a 5x5 box filter (blobs with a digit's
    layout); as many as Q2 judges samples, where the test images allow."""
    n = min(utils.QUALITY_SAMPLES, len(val_x))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n,) + tuple(val_x.shape[1:]), generator=generator).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(val_x[:n], 5, stride=1, padding=2,
                                             count_include_pad=False)
    return {"gaussian noise": noise.to(val_x.device),
            "mean training image": train_x.mean(0, keepdim=True), "blurred test images": blurred}


@torch.no_grad()
def classifier_baselines(classifier, baselines: dict) -> dict:
    """What the Part 1 classifier says about images that are no digits (`baseline_images`), so
    that its verdict on prior samples has a known bias."""
    return {name: utils.classify_samples(classifier, images) for name, images in baselines.items()}


def variety_references(baselines: dict, val_x) -> dict:
    """Q2's variety read against real test images (as many as it judges samples) and the
    baselines of many images: noise, which the measure rewards, and blurred test images."""
    return {name: utils.mean_and_se(utils.variety_per_image(images)) for name, images in
            (("real test images", val_x[:utils.QUALITY_SAMPLES]),
             ("gaussian noise", baselines["gaussian noise"]),
             ("blurred test images", baselines["blurred test images"]))}


@torch.no_grad()
def reconstructions_read_by_classifier(classifier, vae, x, labels) -> dict:
    """Q1: does a reconstruction still show the digit it came from? The share of reconstructions
    G(mu(x)) that the Part 1 classifier reads as the true digit (the originals' share beside it),
    and the predicted digit of each reconstruction; the share's binomial standard error
    sqrt(p (1 - p) / n) over the n images; and the share weighted to equal digit shares with
    its standard error (utils.equal_digit_mean), which compares training and validation images
    on the same digit mix."""
    recon = torch.cat([vae.reconstruct(b) for b in x.split(500)])
    predicted = torch.cat([classifier(b).argmax(1) for b in recon.split(500)]).cpu()
    original = torch.cat([classifier(b).argmax(1) for b in x.split(500)]).cpu()
    labels = labels.cpu()
    right = (predicted == labels).double()
    share = float(right.mean())
    equal = utils.equal_digit_mean(right, labels)
    return {"accuracy": share, "accuracy_se": math.sqrt(share * (1 - share) / len(labels)),
            "equal_digits": {"accuracy": equal["mean"], "accuracy_se": equal["se"]},
            "images": len(labels), "original_accuracy": float((original == labels).double().mean()),
            "predicted": predicted.tolist()}


def reconstructions_read(classifier, out, snapshots, vae, data, show, device) -> dict:
    """Q1: the figure's 10 validation and 10 training reconstructions as the classifier reads
    them at every snapshot, and the share read correctly over all training and validation
    images at the end."""
    labels = {"val": data["val_y"][data["show_val"]], "train": data["train_y"][data["show_train"]]}
    read = {"shown_val_labels": labels["val"].tolist(), "shown_val": {},
            "shown_train_labels": labels["train"].tolist(), "shown_train": {}}
    snapshot = vae_model.VAE(vae.latent_dim).to(device).eval()
    for epoch in snapshots:
        vae_model.load_snapshot(out / f"vae_epoch{epoch}.pt", snapshot, "vae_amortized", device,
                                vae_model.OWN_SNAPSHOT)
        for split in ("val", "train"):
            read[f"shown_{split}"][str(epoch)] = reconstructions_read_by_classifier(
                classifier, snapshot, show[split], labels[split])["predicted"]
    for split, x, y in (("train", data["train_x"], data["train_y"]),
                        ("val", data["val_x"], data["val_y"])):
        result = reconstructions_read_by_classifier(classifier, vae, x, y)
        read[split] = {k: result[k] for k in ("accuracy", "accuracy_se", "equal_digits", "images",
                                              "original_accuracy")}
    # Does either set keep its digits measurably more often, on the same digit mix?
    train, val = read["train"]["equal_digits"], read["val"]["equal_digits"]
    read["train_val_tie"] = (None if None in (train["accuracy_se"], val["accuracy_se"]) else
                             utils.within_two_se(train["accuracy"], val["accuracy"],
                                                 train["accuracy_se"], val["accuracy_se"]))
    return read


@torch.no_grad()
def recon_mse_equal_digits(vae, x, labels) -> dict:
    """Q1's reconstruction error G(mu(x)) against x, weighted to equal digit shares: the
    training subset has 500 images of each digit, the test set does not, and digits differ in
    error (a 1 has little ink), so the raw means would compare different digit mixes."""
    errors = torch.cat([(vae.reconstruct(b) - b).pow(2).flatten(1).mean(1)
                        for b in x.split(500)]).double()
    equal = utils.equal_digit_mean(errors, labels)
    return {"recon_mse": equal["mean"], "recon_mse_se": equal["se"],
            "per_digit": equal["per_digit"], "images_per_digit": equal["images_per_digit"]}


@torch.no_grad()
def aggregate_posterior(vae, train_x) -> dict:
    """The encoder's q over the training images against the prior (Q3 compares it with the
    latent-optimization tables)."""
    mu, logvar = vae.encoder(train_x)
    return {"aggregate_posterior_kl": vae_model.aggregate_posterior_kl(mu, logvar),
            "aggregate_posterior": vae_model.aggregate_posterior_per_dimension(mu, logvar)}


def data_facts(data) -> dict:
    """Which images the run used: the sizes, the subset's definition, the figures' images."""
    return {"train_images": len(data["train_x"]), "val_images": len(data["val_x"]),
            "subset_per_class": len(data["train_x"]) // 10, "subset_seed": utils.SUBSET_SEED,
            "show_train_indices": data["subset"][data["show_train"]].tolist(),
            "show_val_indices": data["show_val"].tolist()}


def judge_by_classifier(classifier, out, snapshots, vae, data, baselines, show, device) -> dict:
    """What Part 1's classifier says: of real test images (the reference for Q2's samples), of
    images that are no digits (its bias), and of Q1's reconstructions."""
    return {"real test images": utils.classify_samples(
                classifier, data["val_x"][:utils.QUALITY_SAMPLES]),
            "classifier_baselines": classifier_baselines(classifier, baselines),
            "reconstructions_read": reconstructions_read(classifier, out, snapshots, vae, data,
                                                         show, device)}


def main(run: utils.Run, argv=None):
    args = parse_args(argv)
    device = utils.device_and_seeds(args.device, args.seed)
    classifier = vae_model.load_classifier(                                    # checked first
        utils.input_file(args.classifier, utils.CLASSIFIER, args.quick), device)
    data = utils.vae_data(args.per_class, args.val_images, device)
    train_x, val_x = data["train_x"], data["val_x"]
    objective = {"objective": args.loss, "sigma_p": args.sigma_p}
    monitor = {"train": train_x[utils.monitor_subset(data["train_y"]).to(device)],
               "val": val_x[utils.monitor_subset(data["val_y"]).to(device)]}

    # Q1: train by Eq. 5, measuring the curves every epoch and keeping the snapshot epochs
    vae = vae_model.VAE(args.latent_dim).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    snapshots = utils.snapshot_epochs(args.epochs)
    steps = utils.steps_per_epoch(len(train_x), args.batch_size)
    # Bookkeeping (utils.Training): the objects named below are restored from checkpoint_last.pt
    # if an earlier run was interrupted, and saved there after each epoch. The loop is the algorithm.
    training = utils.Training(run, args.out, utils.run_config(args, ignore=("classifier",)),
                              args.fresh, args.epochs, steps, "amortized VAE",
                              series=SERIES, model=vae, optimizer=optimizer)
    out = training.out
    for epoch in training:
        vae.train()
        train = train_epoch(vae, optimizer, train_x, args.batch_size, training.progress,
                            **objective)
        vae.eval()
        training.log(**{f"train_{k}": v for k, v in train.items()},
                     **monitor_epoch(vae, monitor, objective))
        if epoch in snapshots:
            vae_model.save_snapshot(out / f"vae_epoch{epoch}.pt", vae, epoch, args.latent_dim,
                                    "vae_amortized", subset_per_class=args.per_class)
    history = training.history
    vae_model.save_snapshot(out / "vae_final.pt", vae, args.epochs, args.latent_dim, "vae_amortized",
                            subset_per_class=args.per_class)
    vae.eval()
    final = {split: vae_model.vae_evaluate(vae.decoder, encode(vae), x, **objective)
             for split, x in (("train", train_x), ("val", val_x))}
    equal_digits = {split: recon_mse_equal_digits(vae, x, data[f"{split}_y"])
                    for split, x in (("train", train_x), ("val", val_x))}

    # Q1's figures, and Q2: the same prior latents through every snapshot's generator
    plot_loss_curves(out / "loss_curves.png", history, monitor, args.loss, args.sigma_p)
    show = {"val": val_x[data["show_val"].to(device)],
            "train": train_x[data["show_train"].to(device)]}
    z_show = vae_model.prior_latents(10, args.latent_dim, args.seed).to(device)
    quality, variety = snapshot_figures(out, snapshots, args.latent_dim, show, z_show, classifier,
                                        device)
    baselines = baseline_images(train_x, val_x, utils.QUALITY_SEED)
    judged = {"classifier_baselines": None, "reconstructions_read": None}
    if classifier is not None:
        judged = judge_by_classifier(classifier, out, snapshots, vae, data, baselines, show, device)
        quality["real test images"] = judged.pop("real test images")

    metrics = {
        **history, "final_train": final["train"], "final_val": final["val"],
        "final_equal_digits": equal_digits,
        "overfit": overfit_verdict(history, equal_digits), "snapshot_epochs": snapshots,
        "monitor_images": {k: len(v) for k, v in monitor.items()},
        # Q2: 1,000 prior samples per snapshot judged by the Part 1 classifier (absent without it)
        "sample_quality": quality or None, **judged,
        # ... and by their variety, which needs no classifier, beside real and baseline images
        "prior_variety": variety, "variety_references": variety_references(baselines, val_x),
        **aggregate_posterior(vae, train_x), "eq7": eq7_check(), **data_facts(data),
        "train_seconds": sum(history["epoch_seconds"]), "steps": args.epochs * steps,
        "latent_dim": args.latent_dim, "loss": args.loss, "sigma_p": args.sigma_p,
        **utils.run_facts(run, device, args),
    }
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"last epoch: train loss {final['train']['loss']:.4f}, validation loss "
          f"{final['val']['loss']:.4f}; {metrics['train_seconds']:.1f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
