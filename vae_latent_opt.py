"""HUJI 67912 Exercise 1, Part 2, Q3: a generator trained by latent optimization (Eq. 6).

Each of the 5,000 training images owns its q = N(mu_i, sigma_i^2 I), stored in tables indexed by
the image's position in the fixed subset, so a shuffled batch always reads its own rows.
Figures: reconstructions at epochs 1, 5, 10, 20, 30 (training images, and validation images whose
latents are fitted with the decoder frozen), compared with Q1, and prior samples beside Q2's.
Like for like: the training latents get 30 updates (one per epoch) and the validation fits 300
steps, so both decoders (this one and Q1's) also get the same 300-step latent fit on the same
training and validation images, separating the optimizer's budget from the method.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from tqdm import tqdm

import model as vae_model
import utils


class LatentTable(nn.Module):
    """Per-image mu_i and r_i = log sigma_i^2, initialized as Q3 asks. Sparse embeddings: each
    row is updated only in the step that uses its image (once per epoch)."""

    def __init__(self, n_images: int, latent_dim: int, seed: int):
        super().__init__()
        mu, logvar = vae_model.init_latents(n_images, latent_dim, seed)
        self.mu = nn.Embedding.from_pretrained(mu, freeze=False, sparse=True)
        self.logvar = nn.Embedding.from_pretrained(logvar, freeze=False, sparse=True)

    def forward(self, idx, xb=None):
        return self.mu(idx), self.logvar(idx)


def q3_verdicts(same: dict, quality) -> dict:
    """Q3's two answers as named outcomes. better_q: whose own proposals (the encoder's mu(x) or
    the table's mu_i) reconstruct the same training images better; better_decoder: whose
    decoder reconstructs better when both get the same latent fit (the budget taken out);
    prior: whether the latent-optimization samples look as good to the classifier as the
    amortized ones (confidence within 0.05, coverage within one digit)."""
    verdicts = {"better_q": None, "better_decoder": None, "prior": None}
    if "amortized" in same:
        a, lo = same["amortized"], same["latent_opt"]
        verdicts["better_q"] = ("amortized" if a["proposed_train"] < lo["proposed_train"]
                                else "latent_opt")
        verdicts["better_decoder"] = ("amortized" if a["fitted_train"] < lo["fitted_train"]
                                      else "latent_opt")
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
    parser.add_argument("--amortized", type=utils.Path,
                        default=utils.OUTPUTS_DIR / "vae_amortized" / "vae_final.pt",
                        help="Q1's final VAE, for the side-by-side figures and comparisons "
                             "(skipped if absent)")
    parser.add_argument("--classifier", type=utils.Path, default=None,
                        help="Part 1's classifier.pt, to judge prior samples (default: "
                             "outputs/sup_classification/classifier.pt if it exists)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = utils.start_run(args)
    # Every file argument is loaded and checked before the first training step.
    amortized = None
    if args.amortized.is_file():
        amortized = vae_model.load_amortized_vae(args.amortized, device)
        if amortized.latent_dim != args.latent_dim:
            raise utils.UsageError(f"{args.amortized} has latent size {amortized.latent_dim}, "
                                   f"this run {args.latent_dim}; pass --latent-dim "
                                   f"{amortized.latent_dim} or another --amortized")
    else:
        print(f"note: {args.amortized} not found; run vae_amortized.py first for the Q1/Q2 rows")
    classifier = vae_model.optional_classifier(args.classifier, device)
    data = utils.vae_data(args.per_class, args.val_images, device)
    train_x = data["train_x"]

    decoder = vae_model.Decoder(args.latent_dim).to(device)
    latents = LatentTable(len(train_x), args.latent_dim, args.seed).to(device)
    opt_decoder = torch.optim.Adam(decoder.parameters(), lr=args.lr)
    opt_latents = torch.optim.SparseAdam(list(latents.parameters()), lr=args.latent_lr)
    config = utils.run_config(args, ignore=("amortized", "classifier", "fit_steps", "fit_lr",
                                            "compare_per_digit"))
    snapshots = utils.snapshot_epochs(args.epochs)
    steps = -(-len(train_x) // args.batch_size)
    run = utils.TrainingRun(args.out, config, args.fresh, args.epochs, steps,
                            "latent optimization", decoder=decoder, latents=latents,
                            opt_decoder=opt_decoder, opt_latents=opt_latents)
    out = run.out
    for epoch in run:
        train = vae_model.vae_epoch(decoder, latents, train_x, args.batch_size,
                                    [opt_decoder, opt_latents], run.progress)
        run.log(**{f"train_{k}": v for k, v in train.items()}, train_recon_mse=(
            vae_model.reconstruction_mse(decoder, latents.mu.weight.detach(), train_x)))
        if epoch in snapshots:
            # The decoder and the latent table together: reconstructions need both.
            vae_model.save_snapshot(out / f"decoder_epoch{epoch}.pt", decoder, epoch,
                                    args.latent_dim, "vae_latent_opt",
                                    mu=latents.mu.weight.detach().cpu(),
                                    logvar=latents.logvar.weight.detach().cpu())
    history = run.history
    vae_model.save_snapshot(out / "decoder_final.pt", decoder, args.epochs, args.latent_dim,
                            "vae_latent_opt")
    decoder.eval()
    final_train = vae_model.vae_evaluate(decoder, latents, train_x)

    # Q3 figures.
    epochs = list(range(1, args.epochs + 1))
    utils.plot_curves(out / "loss_curves.png", {
        "loss (Eq. 6: MSE + mean KL)": {"train (running)": (epochs, history["train_loss"])},
        "reconstruction MSE (mean of q)": {"training images": (epochs, history["train_recon_mse"])},
        "KL per latent dimension": {"train (running)": (epochs, history["train_kl"])},
    })
    show_train, show_val = data["show_train"].to(device), data["show_val"].to(device)
    show_val_x = data["val_x"][show_val]
    z_prior = vae_model.prior_latents(10, args.latent_dim, args.seed).to(device)
    snapshot_decoder = vae_model.Decoder(args.latent_dim).to(device).eval()
    rows_train, rows_val, val_fit = [train_x[show_train]], [show_val_x], {}
    compare = {"train": utils.monitor_subset(data["train_y"], args.compare_per_digit).to(device),
               "val": utils.monitor_subset(data["val_y"], args.compare_per_digit).to(device)}
    compare_x = torch.cat([train_x[compare["train"]], data["val_x"][compare["val"]]])
    n_train = len(compare["train"])
    fit_bar = tqdm(total=(len(snapshots) + 1 + (amortized is not None)) * args.fit_steps,
                   desc="fitting latents to frozen decoders", unit="step")
    for epoch in snapshots:
        ckpt = vae_model.load_snapshot(out / f"decoder_epoch{epoch}.pt", snapshot_decoder,
                                       "vae_latent_opt", device)
        with torch.no_grad():
            rows_train.append(snapshot_decoder(ckpt["mu"].to(device)[show_train]))
        mu, logvar = vae_model.fit_latents(snapshot_decoder, show_val_x, args.fit_steps,
                                           args.fit_lr, init_seed=args.seed, progress=fit_bar)
        with torch.no_grad():
            rows_val.append(snapshot_decoder(mu))
        val_fit[epoch] = vae_model.reconstruction_mse(snapshot_decoder, mu, show_val_x)

    # Same budget for both methods: a fresh fit_steps-step latent fit against each final decoder
    # on the same images, beside the latents each method itself proposes.
    def same_budget(dec, proposed_train, proposed_val):
        mu, _ = vae_model.fit_latents(dec, compare_x, args.fit_steps, args.fit_lr,
                                      init_seed=args.seed, progress=fit_bar)
        mse = lambda m, x: vae_model.reconstruction_mse(dec, m, x)   # noqa: E731
        return {"proposed_train": mse(proposed_train, compare_x[:n_train]),
                "proposed_val": None if proposed_val is None else mse(proposed_val,
                                                                      compare_x[n_train:]),
                "fitted_train": mse(mu[:n_train], compare_x[:n_train]),
                "fitted_val": mse(mu[n_train:], compare_x[n_train:])}

    same = {"latent_opt": same_budget(decoder, latents.mu.weight.detach()[compare["train"]], None)}
    extra_val, extra_prior, amortized_val10 = [], [], None
    if amortized is not None:
        with torch.no_grad():
            encoded = amortized.encoder(compare_x)[0]
        same["amortized"] = same_budget(amortized.decoder, encoded[:n_train], encoded[n_train:])
        with torch.no_grad():
            extra_val = [amortized.reconstruct(show_val_x)]
            amortized_val10 = vae_model.reconstruction_mse(
                amortized.decoder, amortized.encoder(show_val_x)[0], show_val_x)
            extra_prior = [amortized.decoder(z_prior)]
    fit_bar.close()
    with torch.no_grad():
        lo_prior = decoder(z_prior)

    labels = [f"LO epoch {e}" for e in snapshots]
    utils.plot_image_rows(out / "q3_reconstructions_train.png", rows_train,
                          ["original"] + labels, col_labels=list(range(10)))
    utils.plot_image_rows(out / "q3_reconstructions_val.png", rows_val + extra_val,
                          ["original"] + labels + (["Q1 amortized"] if extra_val else []),
                          col_labels=list(range(10)))
    utils.plot_image_rows(out / "q3_prior_samples.png", extra_prior + [lo_prior],
                          (["Q2 amortized"] if extra_prior else []) + ["Q3 latent opt."])

    quality = None
    if classifier is not None:     # the same 1,000 prior latents through both final generators
        z_judge = vae_model.prior_latents(vae_model.QUALITY_SAMPLES, args.latent_dim,
                                          vae_model.QUALITY_SEED).to(device)
        with torch.no_grad():
            quality = {"latent_opt": vae_model.classify_samples(classifier, decoder(z_judge))}
            if amortized is not None:
                quality["amortized"] = vae_model.classify_samples(classifier,
                                                                  amortized.decoder(z_judge))
    final_mu = latents.mu.weight.detach()
    final_logvar = latents.logvar.weight.detach()
    metrics = {
        **history,
        "snapshot_epochs": snapshots,
        "final_train": final_train,
        "val_fit_recon_mse": {str(e): v for e, v in val_fit.items()},
        "amortized_val10_recon_mse": amortized_val10,
        "same_budget": same,
        "same_budget_images": {"train": n_train, "val": len(compare_x) - n_train,
                               "steps": args.fit_steps},
        # Q3's prior question: samples judged by the Part 1 classifier, and how far the latents
        # the decoder was trained on are from N(0, I).
        "sample_quality": quality,
        "aggregate_posterior_kl": vae_model.aggregate_posterior_kl(final_mu, final_logvar),
        "aggregate_posterior": vae_model.aggregate_posterior_per_dimension(final_mu, final_logvar),
        "latent_mu_mean_norm": final_mu.norm(dim=1).mean().item(),
        "latent_mu_std": final_mu.std().item(),
        "latent_sigma2_mean": final_logvar.exp().mean().item(),
        "expected_prior_norm": float(args.latent_dim) ** 0.5,
        "train_seconds": sum(history["epoch_seconds"]),
        "train_images": len(train_x),
        "latent_dim": args.latent_dim,
        "wall_seconds": utils.wall_seconds(),
        "device": str(device),
        "args": vars(args),
    }
    metrics["verdicts"] = q3_verdicts(same, quality)
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"final training loss {history['train_loss'][-1]:.4f}; "
          f"{metrics['train_seconds']:.1f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
