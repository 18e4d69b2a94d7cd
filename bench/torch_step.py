"""Our train step against the authors' GMFlow train step in PyTorch, side by side on one CPU core.

    python bench/torch_step.py                # GM-DiT S/2 16×16×4, K = 8, batch 8, 7 interleaved rounds
    python bench/torch_step.py --batch 32 --rounds 3

Two worker processes, pinned to the same core (``--cpu``) with one thread each (``ONE_THREAD`` XLA flags;
``torch.set_num_threads(1)``), are set up once (compile, one warm-up step), then take turns: rounds
ours, reference, ours, reference, …; in each round a worker runs one untimed call, then ``--steps`` timed
calls of its network forward (no gradient) and of its train step, and reports the medians in CPU time
(``time.process_time``) and wall time. The table gives the median over rounds of each figure and, as the
ratio, the median of the per-round ratios ours / reference.

Ours: the trainer's jitted, state-donating step for ``bench/train_step.py``'s case ``s2_b8`` (or
``s2_b32``), float32, no remat, on a fixed synthetic batch.

The reference is the authors' step (``GMFlow.forward_train`` and ``LatentDiffusionClassImage.train_step``
of github.com/Lakonik/GMFlow) rebuilt for speed, not for bit-equal numbers, at the same shapes and with
the same case config's settings as ours: label dropout to the null class (p 0.1); logit-normal t, t_low
= t (1 − trans_ratio); the two noisings; the network (the diffusers-based GM-DiT of
``tests/unit/authors_gmdit_v2.py``: 6 heads of 64, depth 12, patch 2, 1000 classes, logstd MLP 1024); the
reverse transition to a GM at t_low and its NLL (weight 2); the spectral loss (the authors' SpectrumMLP,
layers [64, 8], base size 4×16×16, and the Knothe–Rosenblatt transport with its 4×4 eigendecomposition,
under no_grad, then FFT); backward; global grad-norm clipping (1.0); ``torch.optim.AdamW`` (lr 1e-3,
betas (0.9, 0.99), no weight decay); and the EMA update of every parameter as their hook does it
(``copy_`` of a ``lerp``). Where it differs from the authors' step:

* float32 on CPU (they train under bf16 autocast on GPUs, with bitsandbytes' AdamW8bit) and no block
  gradient checkpointing (their config turns it on; our case runs without remat);
* our config's optimiser values (theirs: lr 2e-4, betas (0.9, 0.95), weight decay 0.05 except biases,
  clipping at 10 from step 1000 on) and a fixed EMA momentum (theirs ramps up): the same work;
* the network's head is the V2 layout (separate ``proj_out_means`` / ``proj_out_logweights`` linears,
  128 + 32 outputs per token) where their GMFlow V1 net has one ``proj_out_2`` of 160: the same FLOPs;
* their loss's no_grad quartile logging (mixture mean and variance per example, a few elementwise ops on
  the GM) is left out, and the weights are random (0.1 × N(0, 1)), not their initialisation, except for
  the zeroed last layers of the logstd head and the SpectrumMLP (as theirs; the spectral loss overflows
  without).

The reference process imports ``tests/conftest.py`` for its torchvision import workaround (diffusers needs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_step import ONE_THREAD, case_config  # noqa: E402


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _timed(fn, steps: int, sync=lambda out: out) -> tuple[float, float]:
    """Median (CPU s, wall s) of ``steps`` calls of ``fn`` after one untimed call."""
    sync(fn())
    cpu, wall = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        sync(fn())
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return _median(cpu), _median(wall)


def ours(batch: int):
    """Our forward and train step for case ``s2_b<batch>``: ``(forward, step, sync)`` callables."""
    import jax
    import jax.numpy as jnp
    from common import synthetic_train_setup
    from flax import nnx

    from gmflow_jax.models.factory import build_model, split_params
    from gmflow_jax.train.state import init_state

    config = case_config(f"s2_b{batch}")
    _, setup, step_fn, data = synthetic_train_setup(config)
    graphdef, _ = split_params(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0), remat=False)))
    tau = jnp.full((batch,), 500.0, jnp.float32)
    fwd = jax.jit(lambda params, x, labels: nnx.merge(graphdef, params).net(x, tau, labels))
    holder = {"state": init_state(setup, 0)}

    def step():
        holder["state"], metrics = step_fn(holder["state"], data)
        return metrics

    assert bool(jnp.isfinite(step()["loss"]))
    return lambda: fwd(holder["state"].params, data["image"], data["label"]), step, jax.block_until_ready


def spectrum_mlp(c: int, h: int, w: int):
    """The authors' SpectrumMLP (layers [64, 8]) as a function of its input statistics: ``(mlp, log_spectrum)``
    with ``log_spectrum(mean (N, C, H, W), var (N, 1, H, W))`` -> log power spectrum (N, C, H, W)."""
    import torch
    from torch import nn

    mlp = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 8), nn.SiLU(), nn.Linear(8, c * h * w))

    def log_spectrum(mean, var):
        stats = torch.stack([var.mean(dim=(-3, -2, -1)), mean.var(dim=(-2, -1)).mean(dim=-1)], dim=-1)
        spectrum = mlp(stats).reshape(-1, c, h * w)
        return (spectrum.log_softmax(dim=-1) + math.log(h * w)).reshape(-1, c, h, w)

    return mlp, log_spectrum


def kr_to_gaussian(means, logweights, logstds, x, eps: float = 1e-6):
    """Axis-aligned Knothe–Rosenblatt transport of samples ``x`` (N, C, H, W) of the GM (means (N, K, C, H, W),
    logweights (N, K, 1, H, W), logstds (N, 1, 1, 1, 1)) to standard normal samples (N, C, H, W), as the
    authors' ``gm_samples_to_gaussian_samples`` computes it (axes: eigenvectors of the mean covariance)."""
    import torch

    n, k, c, h, w = means.shape
    weights = logweights.exp()
    diffs = (means - (weights * means).sum(1, keepdim=True)).permute(0, 1, 3, 4, 2)  # (N, K, H, W, C)
    cov = (weights.reshape(n, k, h, w, 1, 1) * diffs[..., :, None] * diffs[..., None, :]).sum(1)
    cov = cov + torch.eye(c) * (2 * logstds).exp().reshape(n, 1, 1, 1, 1)  # (N, H, W, C, C)
    axes = torch.linalg.eigh(cov.mean(dim=(1, 2), keepdim=True)).eigenvectors.flip(-1)  # (N, 1, 1, C, C)
    means_rot = means.permute(0, 3, 4, 1, 2) @ axes  # (N, H, W, K, C)
    x_rot = x.permute(0, 2, 3, 1)[..., None, :] @ axes  # (N, H, W, 1, C)
    z = (x_rot[..., None, :] - means_rot[..., None, :, :]) / logstds.exp().reshape(n, 1, 1, 1, 1, 1)
    logw = logweights.reshape(n, k, 1, h, w).permute(0, 3, 4, 1, 2)[..., None, :, :]  # (N, H, W, 1, K, 1)
    slice_w = (logw - 0.5 * torch.cumsum(z[..., :-1].square(), dim=-1)).softmax(dim=-2)
    slice_w = torch.cat([logw.exp().expand(*slice_w.shape[:-1], 1), slice_w], dim=-1)  # (N, H, W, 1, K, C)
    u = (slice_w * torch.erf(z / math.sqrt(2))).sum(-2).clamp(-1 + eps, 1 - eps)  # (N, H, W, 1, C)
    return (torch.erfinv(u) * math.sqrt(2))[..., 0, :].permute(0, 3, 1, 2)


def reference(batch: int):
    """The authors' step rebuilt in PyTorch (module docstring): ``(forward, step, sync)`` callables."""
    import torch

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "unit")]
    import conftest  # noqa: F401  (its _import_torchvision lets diffusers import torchvision on this stack)
    from authors_gmdit_v2 import make_student

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    config = case_config(f"s2_b{batch}")
    m, loss_cfg, optim = config.model, config.loss, config.optim
    c, size, k, t_scale = m.in_channels, m.input_size, m.num_gaussians, m.time_scale
    net = make_student(
        num_gaussians=k,
        logstd_inner_dim=m.logstd_inner_dim,
        num_attention_heads=m.num_heads,
        attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=c,
        num_layers=m.depth,
        sample_size=size,
        patch_size=m.patch_size,
        num_embeds_ada_norm=m.num_classes,
    )
    spectrum_net, log_spectrum = spectrum_mlp(c, size, size)
    for last in (net.proj_out_logstds[-1], spectrum_net[-1]):  # zero-initialised, as the authors do
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    params = list(net.parameters()) + list(spectrum_net.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), weight_decay=optim.weight_decay)
    torch.manual_seed(1)
    x0, labels = torch.randn(batch, c, size, size), torch.randint(0, m.num_classes, (batch,))

    def loss_fn():
        n, eps = batch, 1e-6
        y = torch.where(torch.rand(n) >= loss_cfg.label_dropout, labels, torch.full_like(labels, m.num_classes))
        t = (torch.sigmoid(torch.randn(n)) * t_scale).clamp(1e-4, t_scale)
        t_low = torch.minimum(t * (1 - loss_cfg.trans_ratio), t - 1e-4).clamp(min=0)
        s, s_to = (t / t_scale).reshape(n, 1, 1, 1), (t_low / t_scale).reshape(n, 1, 1, 1)
        noise = torch.randn(2, *x0.shape)
        x_low = (1 - s_to) * x0 + s_to * noise[0]
        a_trans = (1 - s) / (1 - s_to)
        x_t = x_low * a_trans + noise[1] * (s**2 - (a_trans * s_to) ** 2).sqrt()
        means, logweights, logstds = net(x_t, t, y)  # u as a GM: (N, K, C, H, W), (N, K, 1, H, W), (N, 1, 1, 1, 1)

        # reverse transition to a GM over x_{t_low}, and the NLL of x_low under it
        s5, s_to5 = s[:, None], s_to[:, None]
        r, a = s_to5 / s5.clamp(min=eps), (1 - s5) / (1 - s_to5).clamp(min=eps)
        beta = 1 - (r * a) ** 2
        c1, c2, c3 = r**2 * a, beta * (1 - s_to5), beta * s_to5**2
        gm_means = c1 * x_t[:, None] + c2 * (x_t[:, None] - s5 * means)
        gm_logstds = torch.logaddexp(2 * (logstds + (s5 * c2).clamp(min=eps).log()), c3.clamp(min=eps).log()) / 2
        z = (gm_means - x_low[:, None]) * torch.exp(-gm_logstds).clamp(max=1e4)
        ll = (-0.5 * z.square() - gm_logstds).sum(2) + logweights[:, :, 0]  # (N, K, H, W)
        nll = -torch.logsumexp(ll, dim=1).mean() * loss_cfg.weight

        # spectral loss: only the SpectrumMLP gets gradients
        with torch.no_grad():
            weights = logweights.exp()
            g_mean = (weights * means).sum(1)
            g_var = (weights * (means - g_mean[:, None]).square()).sum(1).mean(1, keepdim=True)
            g_var = g_var + (2 * logstds[:, 0]).exp()
            u = (x_t - x0) * (t_scale / t.clamp(min=eps)).reshape(n, 1, 1, 1)
            z_fft = torch.fft.fft2(kr_to_gaussian(means, logweights, logstds, u), norm="ortho")
            z_fft = z_fft.real + z_fft.imag
        log_var = log_spectrum(x_t - s * g_mean, g_var * s**2)
        spectral = (z_fft.square() * (torch.exp(-log_var) - 1) + log_var).mean() * (0.5 * c * loss_cfg.spectral_weight)
        return nll + spectral

    def step():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.clip_norm)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.copy_(torch.lerp(p, e, 0.999))
        return loss

    def forward():
        with torch.no_grad():
            return net(x0, torch.full((batch,), 500.0), labels)

    assert bool(torch.isfinite(step()))
    return forward, step, lambda out: out


def worker(kind: str, batch: int, steps: int, cpu: int) -> None:
    """Sets up ``kind``, prints READY, then measures one round per line read from stdin (RESULT lines)."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    forward, step, sync = (ours if kind == "ours" else reference)(batch)
    print("READY", flush=True)
    for _ in sys.stdin:
        fwd_cpu, fwd_wall = _timed(forward, steps, sync)
        step_cpu, step_wall = _timed(step, steps, sync)
        result = dict(fwd_cpu=fwd_cpu, fwd_wall=fwd_wall, step_cpu=step_cpu, step_wall=step_wall)
        print("RESULT " + json.dumps(result), flush=True)


def _read(proc, tag: str, log) -> str:
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag) :].strip()
    log.seek(0)
    raise SystemExit(f"worker exited (rc {proc.wait()}) before {tag.strip()}:\n{log.read()[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, choices=[8, 32])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds ours, reference, ...")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per round (after one untimed call)")
    parser.add_argument("--cpu", type=int, default=1, help="core both workers are pinned to (-1: no pinning)")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batch, args.steps, args.cpu)
        return

    from common import machine, today

    env = {
        **os.environ,
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip(),
        "OMP_NUM_THREADS": "1",
    }
    procs, logs = {}, {}
    for kind in ("ours", "reference"):  # set up one after the other: compiles do not overlap
        logs[kind] = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--steps", str(args.steps)]
        procs[kind] = subprocess.Popen(
            [*cmd, "--cpu", str(args.cpu)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=logs[kind],
            text=True,
        )
        _read(procs[kind], "READY", logs[kind])
    rounds = {"ours": [], "reference": []}
    for i in range(args.rounds):
        for kind in ("ours", "reference"):
            procs[kind].stdin.write("round\n")
            procs[kind].stdin.flush()
            rounds[kind].append(json.loads(_read(procs[kind], "RESULT ", logs[kind])))
        ratio = rounds["ours"][-1]["step_cpu"] / rounds["reference"][-1]["step_cpu"]
        print(f"round {i + 1}: step CPU ratio {ratio:.3f}", file=sys.stderr, flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    print(f"GM-DiT S/2 16×16×4 (K = 8, depth 12, hidden 384), batch {args.batch}: our train step vs the authors'")
    print(f"PyTorch step, {today()}, {machine()}, torch {_torch_version()}, one core (--cpu {args.cpu}), one thread,")
    print(f"{args.rounds} interleaved rounds of {args.steps} timed calls (each round's median; median over rounds)\n")
    print("| measure | ours (ms) | reference (ms) | ours / reference | per-round ratios |")
    print("|---|---:|---:|---:|---|")
    for key, name in [
        ("step_cpu", "train step, CPU time"),
        ("step_wall", "train step, wall"),
        ("fwd_cpu", "network forward (no grad), CPU time"),
        ("fwd_wall", "network forward (no grad), wall"),
    ]:
        ratios = [o[key] / r[key] for o, r in zip(rounds["ours"], rounds["reference"], strict=True)]
        mine, theirs = (_median([x[key] for x in rounds[k]]) * 1e3 for k in ("ours", "reference"))
        cells = " ".join(f"{x:.2f}" for x in ratios)
        print(f"| {name} | {mine:.0f} | {theirs:.0f} | {_median(ratios):.3f} | {cells} |")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
