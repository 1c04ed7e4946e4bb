"""HUJI 67912 Exercise 1, Part 2, Q3: a generator trained by latent optimization (Eq. 6).

Each of the 5,000 training images owns its q = N(mu_i, sigma_i^2 I), stored in tables indexed by
the image's position in the fixed subset, so a shuffled batch always reads its own rows.
Figures: reconstructions at epochs 1, 5, 10, 20, 30 (training images, and validation images whose
latents are fitted with the decoder frozen), compared with Q1, and prior samples beside Q2's.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from tqdm import tqdm

import model as vae_model
import utils
from vae_amortized import load_snapshot, save_snapshot, snapshot_epochs, vae_data


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


def parse_args(argv=None):
    parser = utils.script_parser("vae_latent_opt", __doc__.splitlines()[0])
    parser.add_quick_argument("--epochs", 30, 2, "training epochs", type=utils.positive_int)
    parser.add_argument("--batch-size", type=utils.positive_int, default=64, help="batch size")
    parser.add_argument("--lr", type=utils.positive_float, default=1e-3,
                        help="Adam learning rate of the decoder")
    parser.add_argument("--latent-lr", type=utils.positive_float, default=1e-2,
                        help="learning rate of the per-image latents (10x, as the exercise says)")
    parser.add_argument("--latent-dim", type=utils.positive_int, default=200, help="latent size d")
    parser.add_quick_argument("--fit-steps", 300, 20, "Adam steps fitting the validation images' "
                              "latents with the decoder frozen", type=utils.positive_int)
    parser.add_argument("--fit-lr", type=utils.positive_float, default=1e-2,
                        help="learning rate of that test-time latent fit")
    parser.add_argument("--amortized", type=utils.Path,
                        default=utils.OUTPUTS_DIR / "vae_amortized" / "vae_final.pt",
                        help="Q1's final VAE, for the side-by-side figures (skipped if absent)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, out = utils.start_run(args)
    data = vae_data(args.quick, device)
    train_x = data["train_x"]

    decoder = vae_model.Decoder(args.latent_dim).to(device)
    latents = LatentTable(len(train_x), args.latent_dim, args.seed).to(device)
    opt_decoder = torch.optim.Adam(decoder.parameters(), lr=args.lr)
    opt_latents = torch.optim.SparseAdam(list(latents.parameters()), lr=args.latent_lr)
    config = utils.run_config(args, ignore=("amortized", "fit_steps", "fit_lr"))
    resume = utils.Resume(out / "checkpoint_last.pt", config, fresh=args.fresh, decoder=decoder,
                          latents=latents, opt_decoder=opt_decoder, opt_latents=opt_latents)
    start, history = resume.start()
    history = history or {key: [] for key in ("train_loss", "train_mse", "train_kl",
                                              "train_recon_mse", "epoch_seconds")}
    snapshots = snapshot_epochs(args.epochs)

    steps = -(-len(train_x) // args.batch_size)
    progress = tqdm(total=args.epochs * steps, initial=(start - 1) * steps,
                    desc="latent optimization", unit="batch")
    for epoch in range(start, args.epochs + 1):
        t0 = time.perf_counter()
        train = vae_model.vae_epoch(decoder, latents, train_x, args.batch_size,
                                    [opt_decoder, opt_latents], progress)
        for part, value in train.items():
            history[f"train_{part}"].append(value)
        history["train_recon_mse"].append(
            vae_model.reconstruction_mse(decoder, latents.mu.weight.detach(), train_x))
        history["epoch_seconds"].append(time.perf_counter() - t0)
        progress.set_postfix(loss=f"{train['loss']:.4f}")
        if epoch in snapshots:
            # The decoder and the latent table together: reconstructions need both.
            utils.save_checkpoint({"model": decoder.state_dict(), "epoch": epoch,
                                   "latent_dim": args.latent_dim, "kind": "vae_latent_opt",
                                   "mu": latents.mu.weight.detach().cpu(),
                                   "logvar": latents.logvar.weight.detach().cpu()},
                                  out / f"decoder_epoch{epoch}.pt")
        resume.save(epoch, history)
    progress.close()
    save_snapshot(out / "decoder_final.pt", decoder, args.epochs, args.latent_dim, "vae_latent_opt")
    final_train = vae_model.vae_evaluate(decoder, latents, train_x)

    # Q3 figures.
    epochs = list(range(1, args.epochs + 1))
    utils.plot_curves(out / "loss_curves.png", {
        "loss (Eq. 6: MSE + mean KL)": {"train (running)": (epochs, history["train_loss"])},
        "reconstruction MSE (mean of q)": {"training images": (epochs, history["train_recon_mse"])},
        "KL per latent dim": {"train (running)": (epochs, history["train_kl"])},
    }, title=f"Latent optimization, {len(train_x):,} training images, d = {args.latent_dim}")
    show_train, show_val = data["show_train"].to(device), data["show_val"].to(device)
    show_val_x = data["val_x"][show_val]
    z_prior = vae_model.prior_latents(10, args.latent_dim, args.seed).to(device)
    snapshot_decoder = vae_model.Decoder(args.latent_dim).to(device).eval()
    rows_train, rows_val, val_fit = [train_x[show_train]], [show_val_x], {}
    fit_bar = tqdm(total=len(snapshots) * args.fit_steps, desc="fitting validation latents",
                   unit="step")
    for epoch in snapshots:
        ckpt = load_snapshot(out / f"decoder_epoch{epoch}.pt", snapshot_decoder, "vae_latent_opt",
                             device)
        with torch.no_grad():
            rows_train.append(snapshot_decoder(ckpt["mu"].to(device)[show_train]))
        mu, logvar = vae_model.fit_latents(snapshot_decoder, show_val_x, args.fit_steps,
                                           args.fit_lr, init_seed=args.seed, progress=fit_bar)
        with torch.no_grad():
            rows_val.append(snapshot_decoder(mu))
        val_fit[epoch] = vae_model.reconstruction_mse(snapshot_decoder, mu, show_val_x)
    fit_bar.close()
    with torch.no_grad():
        lo_prior = snapshot_decoder(z_prior)          # the last snapshot is the final decoder

    labels = [f"LO epoch {e}" for e in snapshots]
    amortized = None
    if args.amortized.is_file():
        amortized = vae_model.VAE(args.latent_dim).to(device).eval()
        load_snapshot(args.amortized, amortized, "vae_amortized", device)
    else:
        print(f"note: {args.amortized} not found; run vae_amortized.py first for the Q1/Q2 rows")
    extra_val, extra_prior, amortized_val10 = [], [], None
    if amortized is not None:
        extra_val = [amortized.reconstruct(show_val_x)]
        amortized_val10 = vae_model.reconstruction_mse(amortized.decoder,
                                                       amortized.encoder(show_val_x)[0], show_val_x)
        with torch.no_grad():
            extra_prior = [amortized.decoder(z_prior)]
    utils.plot_image_rows(out / "q3_reconstructions_train.png", rows_train,
                          ["original"] + labels, col_labels=list(range(10)),
                          title="Q3: training images and G(mu_i) of their optimized latents")
    utils.plot_image_rows(
        out / "q3_reconstructions_val.png", rows_val + extra_val,
        ["original"] + labels + (["Q1 amortized"] if extra_val else []), col_labels=list(range(10)),
        title=f"Q3: validation images, latents fitted with G frozen ({args.fit_steps} Adam steps)")
    utils.plot_image_rows(out / "q3_prior_samples.png", extra_prior + [lo_prior],
                          (["Q2 amortized"] if extra_prior else []) + ["Q3 latent opt."],
                          title="The same 10 prior latents z ~ N(0, I) through each final G")

    final_mu = latents.mu.weight.detach()
    final_sigma2 = latents.logvar.weight.detach().exp()
    metrics = {
        **history,
        "snapshot_epochs": snapshots,
        "final_train": final_train,
        "val_fit_recon_mse": {str(e): v for e, v in val_fit.items()},
        "amortized_val10_recon_mse": amortized_val10,
        "train_seconds": sum(history["epoch_seconds"]),
        "train_images": len(train_x),
        # How far the learned q's are from the prior N(0, I) that samples are drawn from.
        "latent_mu_mean_norm": final_mu.norm(dim=1).mean().item(),
        "latent_mu_std": final_mu.std().item(),
        "latent_sigma2_mean": final_sigma2.mean().item(),
        "expected_prior_norm": float(args.latent_dim) ** 0.5,
        "latent_dim": args.latent_dim,
        "device": str(device),
        "args": vars(args),
    }
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"final training loss {history['train_loss'][-1]:.4f}; "
          f"{metrics['train_seconds']:.1f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
