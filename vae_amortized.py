"""HUJI 67912 Exercise 1, Part 2, Q1 and Q2: an amortized VAE on 5,000 balanced MNIST images.

Q1: loss per epoch (training and validation, with their MSE and KL parts), reconstructions of
10 validation and 10 training images (one per digit) at epochs 1, 5, 10, 20, 30, and the
train-vs-validation reconstruction error that says whether it overfit.
Q2: 10 latents drawn once from the prior, decoded by the generator of each of those epochs, and
1,000 prior samples per epoch judged by the Part 1 classifier (which digits, how confidently).
`--loss elbo` trains the same VAE on the negative ELBO of the sigma_p model instead (the
ablation that shows why Q4's Eq. 9 weights degenerate with the exercise's loss).
"""
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
    parser.add_argument("--classifier", type=utils.Path, default=None,
                        help="Part 1's classifier.pt, to judge prior samples (default: "
                             "outputs/sup_classification/classifier.pt if it exists)")
    return parser.parse_args(argv)


def eq7_check() -> dict:
    """Eq. 7 as printed against the true KL at mu = 0: their minimizers over sigma^2 on a grid,
    and both values at sigma^2 = 1/2 (where the printed form is negative)."""
    log_var = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    zero = torch.zeros_like(log_var)
    half = torch.tensor([math.log(0.5)], dtype=torch.float64)
    return {"kl_minimizer_sigma2": math.exp(log_var[vae_model.kl_std_normal(zero, log_var).argmin()]),
            "eq7_minimizer_sigma2": math.exp(log_var[vae_model.kl_eq7_as_printed(zero, log_var).argmin()]),
            "eq7_at_half": vae_model.kl_eq7_as_printed(zero[:1], half).item(),
            "kl_at_half": vae_model.kl_std_normal(zero[:1], half).item()}


def overfit_verdict(history, final) -> dict:
    """Q1's 'did it overfit?': 'yes' if the validation loss ends more than 1 % above its minimum,
    else 'no' if the reconstruction error on unseen images is within 5 % of the training
    images', else 'mildly' (a generalization gap without the validation loss rising)."""
    val = history["val_loss"]
    gap = (final["val"]["recon_mse"] - final["train"]["recon_mse"]) / final["train"]["recon_mse"]
    rise = val[-1] / min(val) - 1
    verdict = "yes" if rise > 0.01 else ("no" if gap < 0.05 else "mildly")
    return {"verdict": verdict, "recon_gap": gap, "val_loss_rise": rise,
            "best_val_epoch": int(min(range(len(val)), key=val.__getitem__)) + 1}


@torch.no_grad()
def classifier_baselines(classifier, train_x, val_x, seed: int) -> dict:
    """What the Part 1 classifier says about images that are no digits, so that its verdict on
    prior samples has a known bias: Gaussian noise (clipped to the pixel range), the mean
    training image (the blurriest possible "sample") and real test images blurred by a 5x5 box
    filter (blobs with a digit's layout)."""
    n = min(vae_model.QUALITY_SAMPLES, len(val_x))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n,) + tuple(val_x.shape[1:]), generator=generator).clamp(-1, 1)
    mean_image = train_x.mean(0, keepdim=True)
    blurred = torch.nn.functional.avg_pool2d(val_x[:n], 5, stride=1, padding=2,
                                             count_include_pad=False)
    return {"gaussian noise": vae_model.classify_samples(classifier, noise.to(val_x.device)),
            "mean training image": vae_model.classify_samples(classifier, mean_image),
            "blurred test images": vae_model.classify_samples(classifier, blurred)}


@torch.no_grad()
def reconstructions_read_by_classifier(classifier, vae, x, labels) -> dict:
    """Q1: does a reconstruction still show the digit it came from? The share of reconstructions
    G(mu(x)) that the Part 1 classifier reads as the true digit (the originals' share beside it),
    and the predicted digit of each reconstruction."""
    recon = torch.cat([vae.reconstruct(b) for b in x.split(500)])
    predicted = torch.cat([classifier(b).argmax(1) for b in recon.split(500)]).cpu()
    original = torch.cat([classifier(b).argmax(1) for b in x.split(500)]).cpu()
    labels = labels.cpu()
    return {"accuracy": float((predicted == labels).double().mean()),
            "original_accuracy": float((original == labels).double().mean()),
            "predicted": predicted.tolist()}


def main(argv=None):
    args = parse_args(argv)
    device = utils.start_run(args)
    classifier = vae_model.optional_classifier(args.classifier, device)   # checked before training
    data = utils.vae_data(args.per_class, args.val_images, device)
    train_x, val_x = data["train_x"], data["val_x"]
    objective = {"objective": args.loss, "sigma_p": args.sigma_p}

    vae = vae_model.VAE(args.latent_dim).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    snapshots = utils.snapshot_epochs(args.epochs)
    monitor = {"train": train_x[utils.monitor_subset(data["train_y"]).to(device)],
               "val": val_x[utils.monitor_subset(data["val_y"]).to(device)]}

    def encode(idx, xb):
        return vae.encoder(xb)

    steps = -(-len(train_x) // args.batch_size)
    run = utils.TrainingRun(args.out, utils.run_config(args, ignore=("classifier",)), args.fresh,
                            args.epochs, steps, "amortized VAE", model=vae, optimizer=optimizer)
    out = run.out
    for epoch in run:
        vae.train()
        train = vae_model.vae_epoch(vae.decoder, encode, train_x, args.batch_size, [optimizer],
                                    run.progress, **objective)
        vae.eval()
        val = vae_model.vae_evaluate(vae.decoder, encode, monitor["val"], **objective)
        with torch.no_grad():
            train_recon = vae_model.reconstruction_mse(
                vae.decoder, vae.encoder(monitor["train"])[0], monitor["train"])
        run.log(**{f"train_{k}": v for k, v in train.items()},
                **{f"val_{k}": v for k, v in val.items()}, train_recon_mse=train_recon)
        if epoch in snapshots:
            vae_model.save_snapshot(out / f"vae_epoch{epoch}.pt", vae, epoch, args.latent_dim,
                                    "vae_amortized", subset_per_class=args.per_class)
    history = run.history
    vae_model.save_snapshot(out / "vae_final.pt", vae, args.epochs, args.latent_dim, "vae_amortized",
                            subset_per_class=args.per_class)
    vae.eval()
    final = {split: vae_model.vae_evaluate(vae.decoder, encode, x, **objective)
             for split, x in (("train", train_x), ("val", val_x))}
    with torch.no_grad():
        train_mu, train_logvar = vae.encoder(train_x)

    # Figures: every snapshot decodes the same fixed images and the same prior latents.
    epochs = list(range(1, args.epochs + 1))
    loss_name = ("loss (Eq. 5: MSE + mean KL)" if args.loss == "exercise"
                 else f"negative ELBO, sigma_p = {args.sigma_p:g} [nats]")
    utils.plot_curves(out / "loss_curves.png", {
        loss_name: {"train (running)": (epochs, history["train_loss"]),
                    f"validation ({len(monitor['val']):,})": (epochs, history["val_loss"])},
        "reconstruction MSE (mean of q)": {
            f"train ({len(monitor['train']):,})": (epochs, history["train_recon_mse"]),
            f"validation ({len(monitor['val']):,})": (epochs, history["val_recon_mse"])},
        "KL per latent dimension": {
            "train (running)": (epochs, history["train_kl"]),
            f"validation ({len(monitor['val']):,})": (epochs, history["val_kl"])},
    })

    z_show = vae_model.prior_latents(10, args.latent_dim, args.seed).to(device)
    z_judge = vae_model.prior_latents(vae_model.QUALITY_SAMPLES, args.latent_dim,
                                      vae_model.QUALITY_SEED).to(device)
    show_val_x = val_x[data["show_val"].to(device)]
    show_train_x = train_x[data["show_train"].to(device)]
    rows = {"val": [show_val_x], "train": [show_train_x], "prior": []}
    quality = {}
    snapshot_model = vae_model.VAE(args.latent_dim).to(device).eval()
    for epoch in snapshots:
        vae_model.load_snapshot(out / f"vae_epoch{epoch}.pt", snapshot_model, "vae_amortized",
                                device)
        rows["val"].append(snapshot_model.reconstruct(show_val_x))
        rows["train"].append(snapshot_model.reconstruct(show_train_x))
        with torch.no_grad():
            rows["prior"].append(snapshot_model.decoder(z_show))
            if classifier is not None:
                quality[str(epoch)] = vae_model.classify_samples(
                    classifier, snapshot_model.decoder(z_judge))
    if classifier is not None:
        quality["real test images"] = vae_model.classify_samples(
            classifier, val_x[:vae_model.QUALITY_SAMPLES])
        baselines = classifier_baselines(classifier, train_x, val_x, vae_model.QUALITY_SEED)
        # Q1: the figure's 10 validation images at every snapshot, and all images at the end
        recon_read = {"shown_val_labels": data["val_y"][data["show_val"]].tolist(),
                      "shown_val": {}}
        for epoch in snapshots:
            vae_model.load_snapshot(out / f"vae_epoch{epoch}.pt", snapshot_model,
                                    "vae_amortized", device)
            recon_read["shown_val"][str(epoch)] = reconstructions_read_by_classifier(
                classifier, snapshot_model, show_val_x,
                data["val_y"][data["show_val"]])["predicted"]
        for split, x, y in (("train", train_x, data["train_y"]), ("val", val_x, data["val_y"])):
            read = reconstructions_read_by_classifier(classifier, vae, x, y)
            recon_read[split] = {k: read[k] for k in ("accuracy", "original_accuracy")}
    labels = [f"epoch {e}" for e in snapshots]
    for split in ("val", "train"):
        utils.plot_image_rows(out / f"q1_reconstructions_{split}.png", rows[split],
                              ["original"] + labels, col_labels=list(range(10)))
    utils.plot_image_rows(out / "q2_prior_samples.png", rows["prior"], labels)

    metrics = {
        **history,
        "final_train": final["train"],
        "final_val": final["val"],
        "overfit": overfit_verdict(history, final),
        "monitor_images": {k: len(v) for k, v in monitor.items()},
        "snapshot_epochs": snapshots,
        # Q2: 1,000 prior samples per snapshot judged by the Part 1 classifier (absent without it)
        "sample_quality": quality or None,
        "classifier_baselines": baselines if classifier is not None else None,
        "reconstructions_read": recon_read if classifier is not None else None,
        "aggregate_posterior_kl": vae_model.aggregate_posterior_kl(train_mu, train_logvar),
        "aggregate_posterior": vae_model.aggregate_posterior_per_dimension(train_mu, train_logvar),
        "eq7": eq7_check(),
        "train_seconds": sum(history["epoch_seconds"]),
        "train_images": len(train_x),
        "val_images": len(val_x),
        "steps": args.epochs * steps,
        "subset_per_class": len(train_x) // 10,
        "subset_seed": utils.SUBSET_SEED,
        "show_train_indices": data["subset"][data["show_train"]].tolist(),
        "show_val_indices": data["show_val"].tolist(),
        "latent_dim": args.latent_dim,
        "loss": args.loss,
        "sigma_p": args.sigma_p,
        "wall_seconds": utils.wall_seconds(),
        "device": str(device),
        "args": vars(args),
    }
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"last epoch: train loss {final['train']['loss']:.4f}, validation loss "
          f"{final['val']['loss']:.4f}; {metrics['train_seconds']:.1f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
