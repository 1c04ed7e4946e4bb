"""Benchmark (not a test): where `make all`'s time goes on this CPU, against its FLOP limit.

For every workload of the chain it counts the FLOPs of one step with torch's FlopCounterMode,
times a few steps, and prints the achieved GFLOP/s as a fraction of the fp32 matrix peak
measured in the same run (a 2048 x 2048 matmul). It then multiplies by the number of steps each
script takes with its defaults: the chain's FLOP limit (all its FLOPs at peak) against the time
its steps take at the measured rate, and, when outputs/ holds a finished `make all`, the wall
time each script really took.

    .venv/bin/python tests/benchmark_cpu.py            # about a minute
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model  # noqa: E402


def peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def measure(step, repeats: int = 8):
    """(FLOPs of one step, median seconds per step)."""
    step()                                               # warm up
    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return counter.get_total_flops(), statistics.median(times)


def classifier_step(batch=128):
    net = model.build_classifier().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(10, (batch,))

    def step():
        loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def vae_step(batch=64, latent=200, decoder_only=False, unit=False):
    vae = model.VAE(latent)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28)
    mu0, lv0 = torch.zeros(batch, latent, requires_grad=True), torch.zeros(batch, latent,
                                                                           requires_grad=True)

    def step():
        mu, logvar = (mu0, lv0) if decoder_only else vae.encoder(x)
        loss, _, _ = model.vae_loss(x, vae.decoder(model.reparameterize(mu, logvar)), mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def decode_chunk(n=1024, latent=200):
    """Q4's decoding: channels-last weights, 1,024 latents at a time (log_likelihood.py)."""
    dec = model.Decoder(latent).eval().to(memory_format=torch.channels_last)
    z = torch.randn(n, latent)

    def step():
        with torch.no_grad():
            dec(z)
    return step


def laplace_adam_step(images=100, latent=200):
    dec = model.Decoder(latent).eval().requires_grad_(False)
    x, z = torch.randn(images, 1, 28, 28), torch.randn(images, latent, requires_grad=True)

    def step():
        loss = -model.log_joint(x, z, dec, 0.4).sum()
        loss.backward()
    return step


def jacobians(images=25, latent=200):
    dec = model.Decoder(latent).eval().requires_grad_(False)
    z = torch.randn(images, latent)
    return lambda: model.decoder_jacobian(dec, z)


Q4_DECODES = 100 * 1000 * 2 + 10 * 10_000 * 2      # both estimates, then the convergence study
# (name, output folder, step factory, steps in one default run of the script)
WORKLOADS = [
    ("classifier training step, batch 128", "sup_classification", classifier_step, 14 * 157),
    ("amortized VAE step, batch 64", "vae_amortized", vae_step, 30 * 79),
    ("amortized VAE step (ablation, --loss elbo)", "vae_amortized_elbo", vae_step, 30 * 79),
    ("latent-optimization step, batch 64", "vae_latent_opt",
     lambda: vae_step(decoder_only=True), 30 * 79),
    ("Q3 latent fits, 10 images (5 snapshots x 300)", "vae_latent_opt",
     lambda: vae_step(batch=10, decoder_only=True), 5 * 300),
    ("Q3 same-budget fits, 100 images (2 x 300)", "vae_latent_opt",
     lambda: vae_step(batch=100, decoder_only=True), 2 * 300),
    ("lab VAE step (d = 2), batch 128", "ppca_pca", lambda: vae_step(batch=128, latent=2), 5 * 469),
] + [workload for folder in ("log_likelihood", "log_likelihood_elbo") for workload in (
    ("Q4 decoding, 1,024 latents", folder, decode_chunk, Q4_DECODES // 1024),
    ("Q4 Laplace: Adam step on 100 images", folder, laplace_adam_step, 100),
    ("Q4 Laplace: Jacobians of 25 images", folder, jacobians, 3 * 4))]


def main():
    torch.manual_seed(0)
    peak = peak_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s\n")
    print(f"{'workload':58s} {'GFLOP/step':>10s} {'ms/step':>8s} {'GFLOP/s':>8s} {'of peak':>8s}"
          f" {'steps':>6s} {'at peak':>8s} {'measured':>9s}")
    per_script = {}
    for name, script, factory, steps in WORKLOADS:
        flops, seconds = measure(factory())
        rate = flops / seconds / 1e9
        at_peak, measured = steps * flops / peak / 1e9, steps * seconds
        s = per_script.setdefault(script, [0.0, 0.0])
        s[0] += at_peak
        s[1] += measured
        print(f"{name:58s} {flops / 1e9:10.3f} {1e3 * seconds:8.1f} {rate:8.1f} "
              f"{rate / peak:8.0%} {steps:6d} {at_peak:7.1f}s {measured:8.1f}s")
    print(f"\n{'output folder':20s} {'FLOP limit':>10s} {'its steps':>10s} {'wall (make all)':>16s}")
    total = [0.0, 0.0, 0.0]
    for script, (at_peak, measured) in per_script.items():
        wall = script_wall_seconds(script)
        total[0] += at_peak
        total[1] += measured
        total[2] += wall or 0.0
        print(f"{script:20s} {at_peak:9.1f}s {measured:9.1f}s "
              f"{'' if wall is None else f'{wall:15.1f}s'}")
    print(f"{'chain':20s} {total[0]:9.1f}s {total[1]:9.1f}s {total[2]:15.1f}s")
    if total[2]:
        print(f"\nmake all's scripts took {total[2]:.0f} s, {total[2] / total[0]:.1f}x the "
              f"chain's FLOP limit (target: at most 2x); the counted steps at their measured "
              f"rate alone {total[1] / total[0]:.1f}x")


def script_wall_seconds(folder: str):
    """The wall time a finished `make all` recorded in outputs/<folder>/metrics.json (imports,
    data, training, evaluation, figures; None if absent or if that run resumed a finished
    one, whose own time says nothing)."""
    path = ROOT / "outputs" / folder / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return m.get("wall_seconds")


if __name__ == "__main__":
    main()
