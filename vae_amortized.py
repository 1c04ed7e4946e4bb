"""HUJI 67912 Exercise 1, Part 2, Q1 and Q2: an amortized VAE on 5,000 balanced MNIST images.

Q1: loss per epoch (training and validation, with their MSE and KL parts), reconstructions of
10 validation and 10 training images (one per digit) at epochs 1, 5, 10, 20, 30, and the
train-vs-validation reconstruction error that says whether it overfit.
Q2: 10 latents drawn once from the prior, decoded by the generator of each of those epochs.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

import model as vae_model
import utils

SNAPSHOT_EPOCHS = (1, 5, 10, 20, 30)
PER_CLASS = 500           # 10 x 500 = the exercise's 5,000 training images
# Per-epoch curves are measured on fixed balanced monitoring sets of 1,000 training and 1,000
# validation images (evaluating all 15,000 every epoch would cost more than the training);
# the last epoch is evaluated on the full 5,000 and 10,000.
MONITOR_PER_CLASS = 100


def snapshot_epochs(epochs: int) -> list:
    """The question's epochs that this run reaches, plus the last one."""
    return sorted({e for e in SNAPSHOT_EPOCHS if e <= epochs} | {epochs})


def save_snapshot(path, module, epoch: int, latent_dim: int, kind: str) -> None:
    utils.save_checkpoint({"model": module.state_dict(), "epoch": epoch,
                           "latent_dim": latent_dim, "kind": kind}, path)


def load_snapshot(path, module, kind: str, map_location="cpu") -> dict:
    """Load a snapshot written by `save_snapshot` into module, with one-line errors for a file of
    another kind or another latent size."""
    ckpt = utils.load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise utils.CheckpointError(f"{path} is not a {kind} checkpoint")
    if ckpt["latent_dim"] != module.latent_dim:
        raise utils.CheckpointError(f"{path} has latent size {ckpt['latent_dim']}, this model "
                                    f"{module.latent_dim}; pass the matching --latent-dim")
    utils.load_state_dict_checked(module, ckpt["model"], path)
    return ckpt


def vae_data(quick: bool, device):
    """The exercise's balanced 5,000-image training subset and the validation (test) set, in
    [-1, 1], plus the 10 training and 10 validation images (one per digit) that the figures of
    Q1 and Q3 show. Returns a dict."""
    train_x, train_y, val_x, val_y = utils.mnist_tensors("pm1")
    subset = utils.balanced_subset(train_y, 20 if quick else PER_CLASS, utils.SUBSET_SEED)
    if quick:
        val_x, val_y = val_x[:500], val_y[:500]
    # Figure images are fixed data, like the subset: Q1 and Q3 show the very same ones.
    show_train = utils.one_per_digit(train_y[subset], utils.SUBSET_SEED)   # positions in subset
    show_val = utils.one_per_digit(val_y, utils.SUBSET_SEED)
    return {"train_x": train_x[subset].to(device), "train_y": train_y[subset],
            "subset": subset, "val_x": val_x.to(device), "val_y": val_y,
            "show_train": show_train, "show_val": show_val}


def monitor_subset(labels, seed=utils.SUBSET_SEED):
    per_class = min(MONITOR_PER_CLASS, int(torch.bincount(labels, minlength=10).min()))
    return utils.balanced_subset(labels, per_class, seed)


def parse_args(argv=None):
    parser = utils.script_parser("vae_amortized", __doc__.splitlines()[0])
    parser.add_quick_argument("--epochs", 30, 2, "training epochs", type=utils.positive_int)
    parser.add_argument("--batch-size", type=utils.positive_int, default=64, help="batch size")
    parser.add_argument("--lr", type=utils.positive_float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--latent-dim", type=utils.positive_int, default=200, help="latent size d")
    parser.add_argument("--sigma-p", type=utils.positive_float, default=0.4,
                        help="std of p(x|z) = N(G(z), sigma_p^2 I); recorded for Q4 (training uses Eq. 5)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, out = utils.start_run(args)
    data = vae_data(args.quick, device)
    train_x, val_x = data["train_x"], data["val_x"]

    vae = vae_model.VAE(args.latent_dim).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    resume = utils.Resume(out / "checkpoint_last.pt", utils.run_config(args), fresh=args.fresh,
                          model=vae, optimizer=optimizer)
    start, history = resume.start()
    keys = ("train_loss", "train_mse", "train_kl", "val_loss", "val_mse", "val_kl",
            "train_recon_mse", "val_recon_mse", "epoch_seconds")
    history = history or {key: [] for key in keys}
    snapshots = snapshot_epochs(args.epochs)
    monitor = {"train": train_x[monitor_subset(data["train_y"]).to(device)],
               "val": val_x[monitor_subset(data["val_y"]).to(device)]}

    def encode(idx, xb):
        return vae.encoder(xb)

    steps = -(-len(train_x) // args.batch_size)
    progress = tqdm(total=args.epochs * steps, initial=(start - 1) * steps, desc="amortized VAE",
                    unit="batch")
    for epoch in range(start, args.epochs + 1):
        t0 = time.perf_counter()
        vae.train()
        train = vae_model.vae_epoch(vae.decoder, encode, train_x, args.batch_size, [optimizer],
                                    progress)
        vae.eval()
        val = vae_model.vae_evaluate(vae.decoder, encode, monitor["val"])
        for part, value in train.items():
            history[f"train_{part}"].append(value)
        for part, value in val.items():
            history[f"val_{part}"].append(value)
        with torch.no_grad():
            history["train_recon_mse"].append(vae_model.reconstruction_mse(
                vae.decoder, vae.encoder(monitor["train"])[0], monitor["train"]))
        history["epoch_seconds"].append(time.perf_counter() - t0)
        progress.set_postfix(train=f"{train['loss']:.4f}", val=f"{val['loss']:.4f}")
        if epoch in snapshots:
            save_snapshot(out / f"vae_epoch{epoch}.pt", vae, epoch, args.latent_dim, "vae_amortized")
        resume.save(epoch, history)
    progress.close()
    save_snapshot(out / "vae_final.pt", vae, args.epochs, args.latent_dim, "vae_amortized")
    vae.eval()
    final = {split: vae_model.vae_evaluate(vae.decoder, encode, x)
             for split, x in (("train", train_x), ("val", val_x))}

    # Figures: every snapshot decodes the same fixed images and the same prior latents.
    epochs = list(range(1, args.epochs + 1))
    utils.plot_curves(out / "loss_curves.png", {
        "loss (Eq. 5: MSE + mean KL)": {
            "train (running)": (epochs, history["train_loss"]),
            f"validation ({len(monitor['val']):,})": (epochs, history["val_loss"])},
        "reconstruction MSE (mean of q)": {
            f"train ({len(monitor['train']):,})": (epochs, history["train_recon_mse"]),
            f"validation ({len(monitor['val']):,})": (epochs, history["val_recon_mse"])},
        "KL per latent dim": {"train (running)": (epochs, history["train_kl"]),
                              f"validation ({len(monitor['val']):,})": (epochs, history["val_kl"])},
    }, title=f"Amortized VAE, {len(train_x):,} training images, d = {args.latent_dim}")

    z_prior = vae_model.prior_latents(10, args.latent_dim, args.seed).to(device)
    show_val_x = val_x[data["show_val"].to(device)]
    show_train_x = train_x[data["show_train"].to(device)]
    rows = {"val": [show_val_x], "train": [show_train_x], "prior": []}
    snapshot_model = vae_model.VAE(args.latent_dim).to(device).eval()
    for epoch in snapshots:
        load_snapshot(out / f"vae_epoch{epoch}.pt", snapshot_model, "vae_amortized", device)
        rows["val"].append(snapshot_model.reconstruct(show_val_x))
        rows["train"].append(snapshot_model.reconstruct(show_train_x))
        with torch.no_grad():
            rows["prior"].append(snapshot_model.decoder(z_prior))
    labels = [f"epoch {e}" for e in snapshots]
    for split, name in (("val", "validation"), ("train", "training")):
        utils.plot_image_rows(out / f"q1_reconstructions_{split}.png", rows[split],
                              ["original"] + labels, col_labels=list(range(10)),
                              title=f"Q1: {name} images (top) and reconstructions G(mu(x))")
    utils.plot_image_rows(out / "q2_prior_samples.png", rows["prior"], labels,
                          title="Q2: the same 10 prior latents z ~ N(0, I) through each epoch's G")

    metrics = {
        **history,
        "final_train": final["train"],
        "final_val": final["val"],
        "monitor_images": {k: len(v) for k, v in monitor.items()},
        "snapshot_epochs": snapshots,
        "train_seconds": sum(history["epoch_seconds"]),
        "train_images": len(train_x),
        "val_images": len(val_x),
        "subset_per_class": len(train_x) // 10,
        "subset_seed": utils.SUBSET_SEED,
        "show_train_indices": data["subset"][data["show_train"]].tolist(),
        "show_val_indices": data["show_val"].tolist(),
        "latent_dim": args.latent_dim,
        "sigma_p": args.sigma_p,
        "device": str(device),
        "args": vars(args),
    }
    utils.write_metrics(out / "metrics.json", metrics)
    print(f"last epoch: train loss {final['train']['loss']:.4f}, validation loss "
          f"{final['val']['loss']:.4f}; {metrics['train_seconds']:.1f} s; outputs in {out}")


if __name__ == "__main__":
    utils.run_main(main)
