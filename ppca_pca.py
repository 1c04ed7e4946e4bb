"""Uppsala APML lab: PCA, probabilistic PCA and a VAE with a 2-D latent, compared on MNIST.

Full MNIST (60,000 training, 10,000 test images), pixels in [0, 1], images as 784-vectors,
M = 2 latent dimensions. Answers lab questions 4.1 to 4.10 with figures and metrics.json; the
derivations 3.1 to 3.5 are in the report.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import model as vae_model
import utils

LATENT = 2
D = 784


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


def fit_ppca_gradient(x, epochs, batch_size, lr, seed, progress):
    """The lab's way: maximize the exact marginal likelihood by mini-batch Adam, sigma^2 > 0
    through log sigma^2. Initialization: W ~ N(0, 0.1^2), mu = 0, log sigma^2 = 0."""
    gen = torch.Generator().manual_seed(seed)
    w = (0.1 * torch.randn(D, LATENT, generator=gen, dtype=torch.float64)).requires_grad_()
    mu = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    log_sigma2 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, mu, log_sigma2], lr=lr)
    # Cosine decay: the mini-batch noise, not the step size, limits the final accuracy.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch_size))
    curve = []
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = -ppca_log_likelihood(x[idx], w, mu, log_sigma2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            curve.append(-loss.item())
            progress.update(1)
    init = "W ~ N(0, 0.1^2) entrywise, mu = 0, log sigma^2 = 0 (sigma^2 = 1)"
    return (w.detach(), mu.detach(), log_sigma2.detach()), curve, init


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
        # Start sigma^2 near the pixel MSE a good 2-D model reaches (~0.04): a large initial
        # sigma^2 lets the KL dominate the first epochs and slows learning down.
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(0.02)))

    def encode(self, x):
        # channels_last: about 10 % faster convolutions on CPU
        return self.vae.encoder((2 * x.view(-1, 1, 28, 28) - 1).contiguous(
            memory_format=torch.channels_last))

    def decode(self, z):
        return (self.vae.decoder(z).reshape(-1, D) + 1) / 2

    def elbo(self, x, eps=None):
        """Per-image ELBO in nats with one reparameterized sample:
        log N(x; f(z), sigma^2 I) - KL(q || N(0, I)), the KL in closed form (3.5)."""
        mu, logvar = self.encode(x)
        z = vae_model.reparameterize(mu, logvar, eps)
        log_lik = vae_model.log_normal_pdf(x, self.decode(z), self.log_sigma2)
        return log_lik - vae_model.kl_std_normal(mu, logvar).sum(1)


# ----------------------------------------------------------------------------------------------
def sq_error(x, recon, labels):
    """The lab's measure: squared error summed over pixels, averaged over images; per digit too."""
    err = (x.double() - recon.double()).pow(2).sum(1)
    return err.mean().item(), {str(d): err[labels == d].mean().item() for d in range(10)}


def digit_geometry(z, labels):
    """Mean encoding per digit, the encodings' ranges, and the digit pairs whose mean encodings
    are closest (pairwise Euclidean distance, relative to the mean distance so methods with
    different scales compare)."""
    means = torch.stack([z[labels == d].mean(0) for d in range(10)]).double()
    # Fisher-style separation: variance of the digit means over the mean within-digit variance.
    within = torch.stack([z[labels == d].var(0).sum() for d in range(10)]).mean()
    between = means.var(0).sum()
    dist = torch.cdist(means, means)
    pairs = sorted(((dist[i, j].item(), i, j) for i in range(10) for j in range(i + 1, 10)))
    mean_dist = dist[torch.triu_indices(10, 10, 1).unbind()].mean().item()
    return {
        "mean_encoding": {str(d): means[d].tolist() for d in range(10)},
        "range_min": z.min(0).values.tolist(), "range_max": z.max(0).values.tolist(),
        "std": z.double().std(0).tolist(),
        "separation": (between / within).item(),
        "closest_pairs": [{"digits": [i, j], "distance": dd, "relative": dd / mean_dist}
                          for dd, i, j in pairs[:5]],
    }


def parse_args(argv=None):
    parser = utils.script_parser("ppca_pca", __doc__.splitlines()[0])
    parser.add_quick_argument("--ppca-epochs", 10, 1, "PPCA gradient epochs over the training set",
                              type=utils.positive_int)
    parser.add_argument("--ppca-batch-size", type=utils.positive_int, default=500,
                        help="PPCA mini-batch size")
    parser.add_argument("--ppca-lr", type=utils.positive_float, default=0.02,
                        help="PPCA initial Adam lr (cosine decay)")
    parser.add_quick_argument("--epochs", 5, 1, "VAE epochs", type=utils.positive_int)
    parser.add_argument("--batch-size", type=utils.positive_int, default=128, help="VAE batch")
    parser.add_argument("--lr", type=utils.positive_float, default=5e-3,
                        help="VAE peak Adam lr (one-cycle schedule)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, out = utils.start_run(args)
    timings = {}

    train_x, train_y, test_x, test_y = utils.mnist_tensors("unit")
    if args.quick:
        train_x, train_y = train_x[:2000], train_y[:2000]
        test_x, test_y = test_x[:500], test_y[:500]
    train_x, test_x = train_x.view(-1, D), test_x.view(-1, D)
    show = utils.one_per_digit(test_y, utils.SUBSET_SEED)
    results, geometry, encodings, recon_rows = {}, {}, {}, {"original": test_x[show]}

    # --- PCA (4.1, 4.2) -----------------------------------------------------------------------
    t0 = time.perf_counter()
    mean, evals, evecs = covariance_eigen(train_x)
    v = evecs[:, :LATENT]
    z = pca_encode(test_x, mean, v)
    recon = pca_decode(z, mean, v)
    err, per_digit = sq_error(test_x, recon, test_y)
    results["pca"] = {"test_sq_error": err, "test_sq_error_per_digit": per_digit,
                      "explained_variance": (evals[:LATENT].sum() / evals.sum()).item()}
    encodings["PCA"], recon_rows["PCA"] = z, recon[show]
    timings["pca"] = time.perf_counter() - t0

    # --- PPCA: gradient fit (4.3) and closed form ------------------------------------------
    t0 = time.perf_counter()
    x64, t64 = train_x.double(), test_x.double()
    steps = args.ppca_epochs * -(-len(x64) // args.ppca_batch_size)
    bar = tqdm(total=steps, desc="PPCA (Adam)", unit="batch")
    grad_params, curve, init = fit_ppca_gradient(x64, args.ppca_epochs, args.ppca_batch_size,
                                                 args.ppca_lr, args.seed, bar)
    bar.close()
    cf_params = ppca_closed_form(mean, evals, evecs)
    for name, params in (("ppca_gradient", grad_params), ("ppca_closed_form", cf_params)):
        w, mu, log_sigma2 = params
        z_post, cov_post = ppca_posterior(t64, w, mu, log_sigma2)
        recon = z_post @ w.T + mu                       # decode the posterior mean
        err, per_digit = sq_error(test_x, recon, test_y)
        results[name] = {
            "test_sq_error": err, "test_sq_error_per_digit": per_digit,
            "test_log_likelihood": ppca_log_likelihood(t64, w, mu, log_sigma2).mean().item(),
            "train_log_likelihood": ppca_log_likelihood(x64, w, mu, log_sigma2).mean().item(),
            "sigma2": log_sigma2.exp().item(),
            "posterior_std": cov_post.diagonal().sqrt().tolist(),
        }
        if name == "ppca_gradient":
            encodings["PPCA"], recon_rows["PPCA"] = z_post, recon[show]
    results["ppca_gradient"].update(initialization=init, iterations=len(curve),
                                    epochs=args.ppca_epochs, batch_size=args.ppca_batch_size,
                                    lr=args.ppca_lr)
    comparison = {"subspace_angles_deg": subspace_angles_deg(grad_params[0], cf_params[0]),
                  "test_ll_gap_closed_minus_gradient":
                      results["ppca_closed_form"]["test_log_likelihood"]
                      - results["ppca_gradient"]["test_log_likelihood"]}
    timings["ppca"] = time.perf_counter() - t0

    # --- VAE with a 2-D latent (4.7 to 4.10) ------------------------------------------------
    t0 = time.perf_counter()
    lab_vae = LabVAE().to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(lab_vae.parameters(), lr=args.lr)
    xd, td = train_x.to(device), test_x.to(device)
    steps = -(-len(xd) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps,
                                                pct_start=0.15)
    config = {k: val for k, val in vars(args).items() if k in ("seed", "quick", "epochs",
                                                                "batch_size", "lr")}
    resume = utils.Resume(out / "checkpoint_last.pt", config, fresh=args.fresh, model=lab_vae,
                          optimizer=opt, scheduler=sched)
    start, history = resume.start()
    history = history or {"train_elbo": [], "epoch_seconds": []}
    bar = tqdm(total=args.epochs * steps, initial=(start - 1) * steps, desc="VAE d=2",
               unit="batch")
    for epoch in range(start, args.epochs + 1):
        t_epoch = time.perf_counter()
        lab_vae.train()
        total = 0.0
        for idx in utils.batches(len(xd), args.batch_size, shuffle=True, device=device):
            elbo = lab_vae.elbo(xd[idx])
            opt.zero_grad(set_to_none=True)
            (-elbo.mean()).backward()
            opt.step()
            sched.step()
            total += elbo.sum().item()
            bar.update(1)
        history["train_elbo"].append(total / len(xd))
        history["epoch_seconds"].append(time.perf_counter() - t_epoch)
        bar.set_postfix(train_elbo=f"{history['train_elbo'][-1]:.1f}")
        resume.save(epoch, history)
    bar.close()
    utils.save_checkpoint(lab_vae.state_dict(), out / "vae2d_final.pt")
    lab_vae.eval()
    with torch.no_grad():
        test_elbo = torch.cat([lab_vae.elbo(b) for b in td.split(2000)]).mean().item()
        z = torch.cat([lab_vae.encode(b)[0] for b in td.split(2000)]).cpu()
        recon = torch.cat([lab_vae.decode(b.to(device)) for b in z.split(2000)]).cpu()
    err, per_digit = sq_error(test_x, recon, test_y)
    results["vae"] = {"test_sq_error": err, "test_sq_error_per_digit": per_digit,
                      "test_elbo": test_elbo, "train_elbo_per_epoch": history["train_elbo"],
                      "sigma2": lab_vae.log_sigma2.exp().item(), "epochs": args.epochs}
    encodings["VAE"], recon_rows["VAE"] = z, recon[show]
    timings["vae"] = time.perf_counter() - t0     # this run only (a resumed run skips epochs)
    timings["vae_training_all_epochs"] = sum(history["epoch_seconds"])

    # --- Comparisons -------------------------------------------------------------------------
    for name, zz in encodings.items():
        geometry[name.lower()] = digit_geometry(zz.double(), test_y)
    plot_encodings(out / "encodings.png", encodings, test_y)
    utils.plot_image_rows(out / "reconstructions.png", list(recon_rows.values()),
                          list(recon_rows.keys()), col_labels=list(range(10)),
                          title="The same test images reconstructed from 2 numbers",
                          value_range=(0, 1))
    plot_error_bars(out / "sq_error_per_digit.png", results)
    iters = list(range(1, len(curve) + 1))
    closed = results["ppca_closed_form"]["train_log_likelihood"]
    tail = len(curve) // 10                 # zoom: the last 90 % of the iterations
    utils.plot_curves(out / "ppca_log_likelihood.png", {
        "mini-batch log-likelihood per image [nats]": {
            "Adam (mini-batch)": (iters, curve), "closed form (train)": ([1, len(curve)], [closed] * 2)},
        "zoom on the last 90 % [nats]": {
            "Adam (mini-batch)": (iters[tail:], curve[tail:]),
            "closed form (train)": ([iters[tail], len(curve)], [closed] * 2)}},
        xlabel="iteration", title="PPCA fitted by gradient ascent")
    lattice = torch.tensor(np.stack(np.meshgrid(np.linspace(2, -2, 15), np.linspace(-2, 2, 15),
                                                indexing="ij")[::-1], -1).reshape(-1, 2))
    w, mu, _ = grad_params
    utils.plot_image_grid(out / "lattice_ppca.png", (lattice @ w.T + mu).clamp(0, 1), 15,
                          title="PPCA: W z + mu on a lattice z in [-2, 2]^2", value_range=(0, 1))
    with torch.no_grad():
        utils.plot_image_grid(out / "lattice_vae.png",
                              lab_vae.decode(lattice.float().to(device)).cpu(), 15,
                              title="VAE: f(z) on a lattice z in [-2, 2]^2", value_range=(0, 1))
        z_prior = torch.randn(20, LATENT, generator=torch.Generator().manual_seed(args.seed))
        samples = [(z_prior.double() @ w.T + mu).clamp(0, 1), lab_vae.decode(z_prior.to(device)).cpu()]
    utils.plot_image_rows(out / "samples.png", [s[:10] for s in samples] + [s[10:] for s in samples],
                          ["PPCA", "VAE", "PPCA", "VAE"], value_range=(0, 1),
                          title="Means of p(x|z) for z ~ N(0, I)")

    # The error is a sum over pixels, so digits with more ink have more to get wrong.
    ink = test_x.double().pow(2).sum(1)
    metrics = {**results, "encodings": geometry, "ppca_comparison": comparison,
               "test_ink_per_digit": {str(d): ink[test_y == d].mean().item() for d in range(10)},
               "seconds": timings, "train_images": len(train_x), "test_images": len(test_x),
               "device": str(device), "args": vars(args)}
    utils.write_metrics(out / "metrics.json", metrics)
    print("test squared error: " + ", ".join(f"{k} {results[k]['test_sq_error']:.2f}"
                                             for k in ("pca", "ppca_gradient", "ppca_closed_form",
                                                       "vae"))
          + f"; {timings['pca'] + timings['ppca'] + timings['vae']:.0f} s; outputs in {out}")


def plot_encodings(path, encodings, labels):
    plt = utils.pyplot()
    fig, axes = plt.subplots(1, len(encodings), figsize=(4.2 * len(encodings), 4.0))
    for ax, (name, z) in zip(axes, encodings.items()):
        z = z.double().numpy()
        sc = ax.scatter(z[:, 0], z[:, 1], c=labels.numpy(), cmap="tab10", s=1.5, alpha=0.6,
                        vmin=-0.5, vmax=9.5, rasterized=True)
        for d in range(10):
            m = z[labels.numpy() == d].mean(0)
            ax.annotate(str(d), m, fontsize=11, weight="bold", ha="center", va="center",
                        bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "alpha": 0.8})
        ax.set_title(f"{name} encodings of the test set")
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
    fig.colorbar(sc, ax=axes, ticks=range(10), label="digit", fraction=0.02)
    utils.save_figure(fig, path)


def plot_error_bars(path, results):
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    names = ["pca", "ppca_gradient", "ppca_closed_form", "vae"]
    width = 0.2
    for k, name in enumerate(names):
        vals = [results[name]["test_sq_error_per_digit"][str(d)] for d in range(10)]
        ax.bar(np.arange(10) + (k - 1.5) * width, vals, width,
               label=f"{name} ({results[name]['test_sq_error']:.1f})")
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("squared error per image")
    ax.set_title("Test reconstruction error per digit (overall in the legend)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    utils.save_figure(fig, path)


if __name__ == "__main__":
    utils.run_main(main)
