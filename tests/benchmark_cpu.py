"""Benchmark (not a test): where `make all`'s time goes on this CPU, against its FLOP limit.

It names the instruction set torch dispatches to (`--isa avx2` forces AVX2 on an AVX-512
machine, as on most students' laptops), then:

1. every convolution of the course's networks alone (forward and backward at the training
   batch sizes, forward at Q4's 1,024 latents), as model.py computes it and as the plain torch
   layer it rewrites ("torch"), in ms and as a fraction of the fp32 matmul peak;
2. every workload of the chain: the FLOPs of one step (torch's FlopCounterMode, counted on the
   plain torch layers, so a rewrite never counts as more work), its time and fraction of peak,
   and multiplied by the steps each script takes with its defaults, the chain's FLOP limit (all
   its FLOPs at peak) against the time its steps take and, when an output folder holds a
   finished `make all`, the wall time each script really took.

3. with --non-step, the work outside the training steps (evaluation passes, Q3's latent
   fits, Q4's Jacobians and decoding) at the scripts' sizes and at others, per unit of work.

The peak (a 2048 x 2048 matmul) is measured before, between and after the sections and the
highest is used, so that one slow moment does not move every ratio. Layer times are the best
of several repeats (torch's and model.py's timed in turns). Workloads are timed 8 steps per
pass (--passes runs through the list) and shown twice: the best step, what the kernels can
do, and the median step, what a run sustains; the scripts are compared with the median. With `--threads 1` the clock is the thread's CPU time, which other jobs on
a shared machine do not inflate (they still share caches). --adam-fused and
--keep-freed-memory measure two changes the scripts could make (see --help).

    .venv/bin/python tests/benchmark_cpu.py                 # native ISA, a minute or two
    .venv/bin/python tests/benchmark_cpu.py --isa avx2      # the same with AVX2 forced
    .venv/bin/python tests/benchmark_cpu.py --plain         # model.py's layers replaced by torch's
"""
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant (the design, the code and its comments), and checked by running it and by the
# tests in tests/, which compare it with independent references. If you hand it in, keep
# this note true: say which parts you wrote, changed or had written for you.
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What --isa avx2 sets before torch is imported: torch's own kernels (ATen), oneDNN's
# convolutions, and MKL's matmul, which ignores the other two and would otherwise keep its
# AVX-512 peak (about 2x AVX2's), understating every fraction.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: re-run with AVX2 forced in torch, oneDNN and MKL")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 times CPU time")
    parser.add_argument("--plain", action="store_true",
                        help="replace model.py's rewritten layers by the torch layers they "
                             "rewrite (the numbers before the rewrite)")
    parser.add_argument("--outputs", type=Path, default=None,
                        help="folder of a finished make all (default: outputs/)")
    parser.add_argument("--skip-layers", action="store_true", help="no per-layer section")
    parser.add_argument("--passes", type=int, default=2,
                        help="measure every workload this many times through the run and keep "
                             "each one's best (a shared machine's busy moments pass)")
    parser.add_argument("--adam-fused", action="store_true",
                        help="a suggestion measured: the training steps' Adam/AdamW with "
                             "fused=True (the same update up to float rounding)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="a suggestion measured (Linux, glibc): keep freed memory for reuse "
                             "(mallopt) instead of returning it to the system and page-faulting "
                             "it back in every step")
    parser.add_argument("--non-step", action="store_true",
                        help="also time the work outside the training steps (evaluation, Q3's "
                             "latent fits, Q4's Jacobians and decoding) at other batch sizes")
    args = parser.parse_args()
    if args.threads is not None and not 1 <= args.threads <= 256:
        parser.error("--threads must be 1 to 256")
    if not 1 <= args.passes <= 20:
        parser.error("--passes must be 1 to 20")
    return args


ARGS = parse_args()
if ARGS.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
    sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ENV}))

MALLOC_KEPT = False
if ARGS.keep_freed_memory:
    # glibc returns the freed top of its heap to the system once more than M_TRIM_THRESHOLD is
    # free, and serves blocks above M_MMAP_THRESHOLD by mmap; either way the next step's
    # tensors page-fault back in (about 2,000 faults, 4 ms of system time, per VAE step).
    # Fixed thresholds of 256 MiB keep that memory for reuse.
    import ctypes
    import ctypes.util
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        MALLOC_KEPT = bool(_libc.mallopt(-1, 256 << 20) and _libc.mallopt(-3, 256 << 20))
    except (OSError, AttributeError):
        pass

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import log_likelihood  # noqa: E402
import model  # noqa: E402

if ARGS.threads:
    torch.set_num_threads(ARGS.threads)
CLOCK = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
PEAKS: list[float] = []


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def plain(net: nn.Module) -> nn.Module:
    """`net` with each of model.py's rewritten layers swapped (in place, same parameters) for
    the torch layer it rewrites: the network as it was before the rewrite."""
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, model.REWRITTEN_LAYERS):
                torch_layer = type(child).__mro__[1].__new__(type(child).__mro__[1])
                torch_layer.__dict__ = child.__dict__
                setattr(module, name, torch_layer)
    return net


def maybe_plain(net):
    return plain(net) if ARGS.plain else net


def measure_peak(n: int = 2048, repeats: int = 8) -> float:
    """One more measurement of the fp32 matmul rate (GFLOP/s); returns the highest so far."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    PEAKS.append(2 * n**3 / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9)
    return max(PEAKS)


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def count_plain_flops(factory) -> int:
    """The FLOPs of one step, counted on the plain torch layers."""
    global_plain = ARGS.plain
    ARGS.plain = True
    torch.manual_seed(0)
    flops = count_flops(factory())
    ARGS.plain = global_plain
    return flops


def step_seconds(factory, repeats: int = 8) -> list:
    """The times of `repeats` steps of a freshly built workload, after two warm-up steps."""
    torch.manual_seed(0)
    step = factory()
    step()                                               # warm up
    step()
    return [timed(step) for _ in range(repeats)]


def best_seconds(factory, repeats: int = 8) -> float:
    return min(step_seconds(factory, repeats))


# ----------------------------------------------------------------------------------------------
# Each convolution alone
# ----------------------------------------------------------------------------------------------
def layer_inputs(net, x):
    """[(name, layer, its input)] for every convolution of `net` on the input x, each input in
    the memory layout the network hands it."""
    found = []
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: found.append((name, m,
                                                                                inp[0].detach())))
             for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return found


def layer_step(layer, x, backward: bool):
    """One pass of the layer on x: forward, or forward and backward (input gradient unless x is
    the images, weight and bias gradients as in training)."""
    x = x.clone(memory_format=torch.preserve_format).requires_grad_(backward and x.shape[1] > 1)

    def step():
        if backward:
            out = layer(x)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                layer(x)
    return step


def interleaved_best(steps, repeats: int = 12) -> list[float]:
    """The best seconds of each step, timed in turns (so that a busy moment of a shared machine
    slows all of them, not one)."""
    for step in steps:
        step()
        step()
    best = [float("inf")] * len(steps)
    for _ in range(repeats):
        for i, step in enumerate(steps):
            best[i] = min(best[i], timed(step))
    return best


def layer_table():
    torch.manual_seed(0)
    cases = [  # (network, builder, input shape, backward?, channels-last as in Q4)
        ("encoder", lambda: model.Encoder(200), (64, 1, 28, 28), True, False),
        ("encoder (lab)", lambda: model.Encoder(2), (128, 1, 28, 28), True, False),
        ("decoder d=200", lambda: model.Decoder(200), (64, 200), True, False),
        ("decoder d=2 (lab)", lambda: model.Decoder(2), (128, 2), True, False),
        ("decoder Q4", lambda: model.Decoder(200), (1024, 200), False, True),
        ("classifier", lambda: model.build_classifier(), (128, 1, 28, 28), True, False),
    ]
    print(f"{'network':18s} {'layer':34s} {'batch':>5s} {'pass':>4s} {'MFLOP':>7s} "
          f"{'torch ms':>9s} {'of peak':>7s} {'model ms':>9s} {'of peak':>7s}")
    rows = []
    for net_name, build, shape, backward, q4 in cases:
        net = build()
        if net_name == "classifier":
            net = net.to(memory_format=torch.channels_last)       # as sup_classification.py
        if q4:
            net = net.to(memory_format=torch.channels_last)       # as log_likelihood.py
        x = torch.randn(*shape)
        if net_name == "classifier":
            x = x.contiguous(memory_format=torch.channels_last)
        ours = layer_inputs(net, x)
        theirs = layer_inputs(plain(copy.deepcopy(net)), x)
        for (name, layer, inp), (_, torch_layer, torch_inp) in zip(ours, theirs):
            if isinstance(layer, model.PooledConv2d):   # its torch counterpart: conv, then pool
                torch_layer = nn.Sequential(torch_layer, nn.AdaptiveAvgPool2d(1))
            # FLOPs as torch's layer counts them (a rewrite counts neither more nor less work)
            step_torch = layer_step(torch_layer, torch_inp, backward)
            flops = count_flops(step_torch)
            t_torch, t_ours = interleaved_best([step_torch, layer_step(layer, inp, backward)])
            rows.append((net_name, name, t_torch, t_ours, flops))
            peak = max(PEAKS)
            pass_name = "f+b" if backward else "fwd"
            print(f"{net_name:18s} {describe(layer):34s} {shape[0]:5d} {pass_name:>4s}"
                  f" {flops / 1e6:7.1f} {1e3 * t_torch:9.2f} {flops / t_torch / 1e9 / peak:7.0%}"
                  f" {1e3 * t_ours:9.2f} {flops / t_ours / 1e9 / peak:7.0%}")
    return rows


def describe(layer) -> str:
    kind = "convT" if isinstance(layer, nn.ConvTranspose2d) else "conv"
    rewritten = "*" if isinstance(layer, model.REWRITTEN_LAYERS) else ""
    pooled = " +pool" if isinstance(layer, model.PooledConv2d) else ""
    k, s = layer.kernel_size, layer.stride
    return f"{kind}{rewritten} {layer.in_channels}->{layer.out_channels} k{k[0]} s{s[0]}{pooled}"


def adam(params, cls=torch.optim.Adam, **kwargs):
    """The scripts' optimizer (fused with --adam-fused)."""
    return cls(params, **kwargs, **({"fused": True} if ARGS.adam_fused else {}))


def classifier_step(batch=128):
    net = maybe_plain(model.build_classifier()).to(memory_format=torch.channels_last)
    opt = adam(net.parameters(), torch.optim.AdamW, lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(10, (batch,))

    def step():
        loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def vae_step(batch=64, latent=200, decoder_only=False):
    """A training step: the amortized VAE's, or (decoder_only) latent optimization's, whose
    latents' own sparse Adam step on 64 table rows is left out."""
    vae = maybe_plain(model.VAE(latent))
    opt = adam(vae.parameters(), lr=1e-3)
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


def fit_step(images=10, latent=200):
    """Q3's test-time latent fit (vae_latent_opt.fit_latents): the decoder frozen, Adam on
    the images' own mu and log sigma^2."""
    dec = maybe_plain(model.Decoder(latent)).eval().requires_grad_(False)
    x = torch.randn(images, 1, 28, 28)
    mu, logvar = (torch.randn(images, latent, requires_grad=True) for _ in range(2))
    opt = adam([mu, logvar], lr=1e-2)

    def step():
        loss, _, _ = model.vae_loss(x, dec(model.reparameterize(mu, logvar)), mu, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def q4_decoder(latent=200):
    """Q4's decoder as log_likelihood.py holds it: frozen, channels-last weights."""
    return maybe_plain(model.Decoder(latent)).eval().requires_grad_(False).to(
        memory_format=torch.channels_last)


def decode_chunk(n=1024, latent=200):
    """Q4's decoding: channels-last weights, 1,024 latents at a time (log_likelihood.py)."""
    dec = q4_decoder(latent)
    z = torch.randn(n, latent)

    def step():
        with torch.no_grad():
            dec(z)
    return step


def laplace_adam_step(images=100, latent=200):
    dec = q4_decoder(latent)
    x, z = torch.randn(images, 1, 28, 28), torch.randn(images, latent, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)

    def step():
        loss = -model.log_joint(x, z, dec, 0.4).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def jacobians(images=25, latent=200, chunk=25, channels_last=True):
    dec = q4_decoder(latent)
    if not channels_last:
        dec = dec.to(memory_format=torch.contiguous_format)
    z = torch.randn(images, latent)
    return lambda: log_likelihood.decoder_jacobian(dec, z, chunk)


# ----------------------------------------------------------------------------------------------
# The work outside the training steps, at the scripts' sizes and at others (--non-step)
# ----------------------------------------------------------------------------------------------
def evaluation(images=1000, batch=500, one_decoder_call=False):
    """model.vae_evaluate with the amortized posterior (vae_amortized.py's monitoring and
    final passes); one_decoder_call: the same sums with the sampled z and the mean decoded in
    one call (a suggestion)."""
    vae = maybe_plain(model.VAE(200)).eval()
    x = torch.randn(images, 1, 28, 28)
    if not one_decoder_call:
        return lambda: model.vae_evaluate(vae.decoder, lambda idx, xb: vae.encoder(xb), x,
                                          batch_size=batch)

    def run():
        sums = torch.zeros(4)
        with torch.no_grad():
            for xb in x.split(batch):
                mu, logvar = vae.encoder(xb)
                both = vae.decoder(torch.cat([model.reparameterize(mu, logvar), mu]))
                loss, mse, kl = model.vae_loss(xb, both[:len(xb)], mu, logvar)
                sums += torch.stack([loss, mse, kl, F.mse_loss(both[len(xb):], xb)]) * len(xb)
        return (sums / len(x)).tolist()
    return run


def q3_fits(snapshots=5, images=10, latent=200, vmapped=False):
    """One Adam step of each of Q3's snapshot fits (the decoders frozen): one after the other
    as vae_latent_opt.py does, or (vmapped, a suggestion) all snapshots' decoders at once with
    torch.func (stack_module_state + vmap over functional_call), the same update per fit."""
    if not vmapped:
        steps = [fit_step(images, latent) for _ in range(snapshots)]
        return lambda: [step() for step in steps]
    decoders = [maybe_plain(model.Decoder(latent)).eval().requires_grad_(False)
                for _ in range(snapshots)]
    params, buffers = torch.func.stack_module_state(decoders)
    skeleton = copy.deepcopy(decoders[0]).to("meta")
    decode = torch.func.vmap(
        lambda p, b, z: torch.func.functional_call(skeleton, (p, b), (z,)))
    x = torch.randn(snapshots, images, 1, 28, 28)
    mu, logvar = (torch.randn(snapshots, images, latent, requires_grad=True) for _ in range(2))
    opt = adam([mu, logvar], lr=1e-2)

    def step():
        out = decode(params, buffers, model.reparameterize(mu, logvar))
        loss = sum(model.vae_loss(x[i], out[i], mu[i], logvar[i])[0] for i in range(snapshots))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


NON_STEP = [  # (what, the scripts' choice?, factory, unit, units per call)
    ("evaluation, 1,000 images, batch 100", False, lambda: evaluation(batch=100), "1k img", 1),
    ("evaluation, 1,000 images, batch 500", True, lambda: evaluation(batch=500), "1k img", 1),
    ("evaluation, 1,000 images, batch 1,000", False, lambda: evaluation(batch=1000), "1k img",
     1),
    ("evaluation, batch 500, z and mean in one decoder call", False,
     lambda: evaluation(batch=500, one_decoder_call=True), "1k img", 1),
    ("Q3 fits: 5 snapshots x 10 images, one after the other", True, q3_fits, "step", 1),
    ("Q3 fits: the same, vmapped over the 5 decoders", False,
     lambda: q3_fits(vmapped=True), "step", 1),
    ("Q3 fit of 100 images (same-budget comparison)", True, lambda: fit_step(100), "step", 1),
    ("Q3 fit of 110 images (+ the last snapshot's 10)", False, lambda: fit_step(110), "step", 1),
    ("Q4 Jacobians, 100 images, chunks of 10", False,
     lambda: jacobians(100, chunk=10), "25 img", 4),
    ("Q4 Jacobians, 100 images, chunks of 25", True,
     lambda: jacobians(100, chunk=25), "25 img", 4),
    ("Q4 Jacobians, 100 images, chunks of 100", False,
     lambda: jacobians(100, chunk=100), "25 img", 4),
    ("Q4 Jacobians, chunks of 25, contiguous weights", False,
     lambda: jacobians(100, chunk=25, channels_last=False), "25 img", 4),
    ("Q4 decoding, 256 latents a call", False, lambda: decode_chunk(256), "1k lat", 0.25),
    ("Q4 decoding, 1,024 latents a call", True, lambda: decode_chunk(1024), "1k lat", 1),
    ("Q4 decoding, 4,096 latents a call", False, lambda: decode_chunk(4096), "1k lat", 4),
]


def non_step_table():
    print(f"\nOutside the training steps (x = the scripts' choice today): time per unit of work, "
          f"best of {ARGS.passes} passes")
    print(f"{'':2s}{'what':56s} {'unit':>7s} {'ms/unit':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    flops = [count_plain_flops(factory) for _, _, factory, _, _ in NON_STEP]
    best = [float("inf")] * len(NON_STEP)
    for _ in range(ARGS.passes):
        for i, (_, _, factory, _, _) in enumerate(NON_STEP):
            best[i] = min(best[i], best_seconds(factory, repeats=3))
        measure_peak()
    peak = max(PEAKS)
    for (what, current, _, unit, units), f, seconds in zip(NON_STEP, flops, best):
        print(f"{'x' if current else '':2s}{what:56s} {unit:>7s} {1e3 * seconds / units:8.1f} "
              f"{f / seconds / 1e9:8.1f} {f / seconds / 1e9 / peak:8.0%}")


Q4_DECODES = 100 * 1000 * 2 + 10 * 10_000 * 2      # both estimates, then the convergence study
# (name, output folder, step factory, steps in one default run of the script)
WORKLOADS = [
    ("classifier training step, batch 128", "sup_classification", classifier_step, 14 * 157),
    ("amortized VAE step, batch 64", "vae_amortized", vae_step, 30 * 79),
    ("amortized VAE step (ablation, --loss elbo)", "vae_amortized_elbo", vae_step, 30 * 79),
    ("latent-optimization step, batch 64", "vae_latent_opt",
     lambda: vae_step(decoder_only=True), 30 * 79),
    ("Q3 latent fits, 10 images (5 snapshots x 300)", "vae_latent_opt",
     lambda: fit_step(10), 5 * 300),
    ("Q3 same-budget fits, 100 images (2 x 300)", "vae_latent_opt", lambda: fit_step(100),
     2 * 300),
    # Q3(b)'s controls (vae_latent_opt.start_control): the same training from other starts
    ("latent-optimization step, Q3's wide-start control", "vae_latent_opt",
     lambda: vae_step(decoder_only=True), 30 * 79),
    ("latent-optimization step, Q3's unit-sigma control", "vae_latent_opt",
     lambda: vae_step(decoder_only=True), 30 * 79),
    ("lab VAE step (d = 2), batch 128", "ppca_pca", lambda: vae_step(batch=128, latent=2), 5 * 469),
] + [workload for folder in ("log_likelihood", "log_likelihood_elbo") for workload in (
    ("Q4 decoding, 1,024 latents", folder, decode_chunk, Q4_DECODES // 1024),
    ("Q4 Laplace: Adam step on 100 images", folder, laplace_adam_step, 100),
    ("Q4 Laplace: Jacobians of 25 images", folder, jacobians, 3 * 4))]


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} (asked: {ARGS.isa}"
          f"{', '.join([''] + [f'{k}={os.environ[k]}' for k in AVX2_ENV if k in os.environ])}); "
          f"layers: {'torch (--plain)' if ARGS.plain else 'model.py'}; "
          f"clock: {'thread CPU time' if CLOCK is time.thread_time else 'wall'}"
          f"{'; Adam fused' if ARGS.adam_fused else ''}"
          f"{'; freed memory kept (mallopt)' if MALLOC_KEPT else ''}"
          f"{'; --keep-freed-memory: mallopt unavailable' if ARGS.keep_freed_memory and not MALLOC_KEPT else ''}")
    measure_peak()
    measure_peak()
    if not ARGS.skip_layers:
        print(f"\nEach convolution alone (* = rewritten in model.py; fractions of the highest "
              f"peak so far, {max(PEAKS):.0f} GFLOP/s)")
        layer_table()
        measure_peak()
    # Each step is timed many times: the best shows what the kernels can do, the median what a
    # run sustains (on a shared or throttling machine the two differ by 10 to 40 %), and the
    # median is what the scripts' time is compared with.
    print(f"\n{'workload':50s} {'GFLOP/step':>10s} {'best ms':>8s} {'of peak':>7s} "
          f"{'median ms':>9s} {'of peak':>7s} {'steps':>6s} {'at peak':>8s} {'at median':>9s}")
    per_script = {}
    flops = [count_plain_flops(factory) for _, _, factory, _ in WORKLOADS]
    times = [[] for _ in WORKLOADS]
    for _ in range(ARGS.passes):
        for i, (_, _, factory, _) in enumerate(WORKLOADS):
            times[i] += step_seconds(factory)
            if i % 4 == 3:
                measure_peak()
    peak = measure_peak()
    for (name, script, _, steps), flops, seconds in zip(WORKLOADS, flops, times):
        best, median = min(seconds), statistics.median(seconds)
        at_peak, measured = steps * flops / peak / 1e9, steps * median
        s = per_script.setdefault(script, [0.0, 0.0])
        s[0] += at_peak
        s[1] += measured
        print(f"{name[:50]:50s} {flops / 1e9:10.3f} {1e3 * best:8.1f} "
              f"{flops / best / 1e9 / peak:7.0%} {1e3 * median:9.1f} "
              f"{flops / median / 1e9 / peak:7.0%} {steps:6d} {at_peak:7.1f}s {measured:8.1f}s")
    if ARGS.non_step:
        non_step_table()
        peak = max(PEAKS)
    print(f"\nfp32 matmul peak: {peak:.0f} GFLOP/s, the highest of "
          f"{', '.join(f'{p:.0f}' for p in PEAKS)} measured through the run")
    outputs = ARGS.outputs or ROOT / "outputs"
    start_up = start_up_seconds()
    print(f"\nstart-up of a script (imports until --help prints, best of 3): {start_up:.1f} s")
    print(f"\n{'output folder':20s} {'FLOP limit':>10s} {'its steps':>10s} "
          f"{'wall (make all)':>16s} {'not in steps':>13s}   (wall times from {outputs})")
    total, walls, notes = [0.0, 0.0, 0.0], {}, set()
    capability = torch.backends.cpu.get_cpu_capability()
    for script, (at_peak, measured) in per_script.items():
        wall, note = script_wall_seconds(outputs, script, capability)
        walls[script] = wall
        notes |= {note} - {None}
        total[0] += at_peak
        total[1] += measured
        total[2] += wall or 0.0
        print(f"{script:20s} {at_peak:9.1f}s {measured:9.1f}s "
              f"{'' if wall is None else f'{wall:15.1f}s {wall - measured:12.1f}s'}")
    complete = all(w is not None for w in walls.values())
    print(f"{'chain':20s} {total[0]:9.1f}s {total[1]:9.1f}s "
          f"{f'{total[2]:15.1f}s {total[2] - total[1]:12.1f}s' if complete else ''}")
    for note in sorted(notes):
        print(note)
    if complete:
        rest, imports = total[2] - total[1], len(per_script) * start_up
        print(f"\nmake all's scripts took {total[2]:.0f} s, {total[2] / total[0]:.1f}x the "
              f"chain's FLOP limit (target: at most 2x). The counted steps at their median "
              f"rate take {total[1]:.0f} s, {total[1] / total[0]:.1f}x the limit by themselves. "
              f"The other {rest:.0f} s: the {len(per_script)} scripts' start-up, "
              f"{imports:.0f} s, and {rest - imports:.0f} s of work that is not a counted step "
              f"(evaluation passes, data, figures, PCA and PPCA fits, checkpoints)")
    else:
        print(f"\nno whole make all to compare in {outputs} (see above): the counted steps at "
              f"their median rate take {total[1] / total[0]:.1f}x the chain's FLOP limit")


def start_up_seconds(repeats: int = 3) -> float:
    """What each script pays before its first step: a script's imports, timed as `--help`
    (which prints once they are done), in a fresh process with this benchmark's ISA."""
    command = [sys.executable, str(ROOT / "sup_classification.py"), "--help"]
    return min(timed_process(command) for _ in range(repeats))


def timed_process(command) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def script_wall_seconds(outputs: Path, folder: str, capability: str):
    """The wall time a finished `make all` recorded in outputs/<folder>/metrics.json (imports,
    data, training, evaluation, figures), and None with a note where there is none to compare:
    no such file, a run on another device, instruction set (an AVX-512 run against AVX2's
    peak, say) or torch version, or a run that resumed epochs an earlier one trained."""
    path = outputs / folder / "metrics.json"
    if not path.is_file():
        return None, None
    m = json.loads(path.read_text())
    ran_on = (m.get("device"), m.get("cpu_capability"), m.get("torch"))
    if ran_on != ("cpu", capability, torch.__version__):
        return None, (f"(not compared: {folder} ran on {ran_on[0]}, "
                      f"{ran_on[1] or 'instruction set not recorded'}, torch {ran_on[2]}; "
                      f"this benchmark runs on cpu, {capability}, torch {torch.__version__})")
    if m.get("resumed_epochs", 0):
        return None, (f"(not compared: {folder} resumed {m['resumed_epochs']} epochs of an "
                      f"earlier run; time a make all in a fresh --out)")
    return m.get("wall_seconds"), None


if __name__ == "__main__":
    main()
