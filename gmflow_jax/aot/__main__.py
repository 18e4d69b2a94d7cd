"""``python -m gmflow_jax.aot``: compile the train step (and the sampler) for a TPU topology, here.

    python -m gmflow_jax.aot --config imagenet_gmdit_k8 --topology v5p:2x4x4 [--config.batch_size=2048 ...]
    python -m gmflow_jax.aot --config imagenet_gmdit_k8 --topology v5p-64 --nosampler

Needs libtpu (``pip install 'gmflow_jax[tpu]'`` or ``-r requirements-test.txt``), not a TPU: the
compile runs on this machine's CPU. Prints per-device memory against the chip's HBM, compiled and
analytic model FLOPs, the step (and sampler call) time, images/s and MFU predicted by the TPU
compiler's cost model, and a bracket at 40 % / 60 % MFU; ``--breakdown`` adds the step's parts, each
compiled alone (``gmflow_jax.aot.breakdown``); exits 1 with one line naming the shortfall
when the step does not fit.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: no local accelerator is needed or probed

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from gmflow_jax import aot, cli  # noqa: E402
from gmflow_jax.aot import breakdown  # noqa: E402
from gmflow_jax.train.config import define_config_flag  # noqa: E402

FLAGS = flags.FLAGS
define_config_flag("config", "Experiment config: a name in configs/ (imagenet_gmdit_k8) or a file path, with ':arg'.")
flags.DEFINE_string("topology", None, "TPU topology ('v5p:4x4x4') or accelerator type ('v5p-64', 'v5litepod-256').")
flags.DEFINE_bool(
    "breakdown", False, "Also compile the step's parts one by one and print their share of the step's time."
)
flags.DEFINE_bool("sampler", True, "Also compile the sampler (image models).")
flags.DEFINE_integer("sampler_batch_per_device", 256, "Sampler batch per device.")
flags.DEFINE_enum("solver", "gm-ode", ["gm-ode", "gm-sde"], "Sampler solver.")
flags.DEFINE_integer("order", 2, "Solver order.")
flags.DEFINE_integer("num_steps", 8, "Sampler steps.")
flags.DEFINE_bool("guided", True, "Guided sampling (conditional and unconditional evaluations).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) off: an executable for a topology without its
    # chips cannot be loaded back on this machine; an entry would only be written, then warned about when read.
    jax.config.update("jax_enable_compilation_cache", False)
    if FLAGS.config is None or not FLAGS.topology:
        raise app.UsageError("--config and --topology are required.")
    config = FLAGS.config
    name = aot.resolve_topology(FLAGS.topology)
    devices = aot.topology_devices(name)
    chip = aot.chip_for(devices[0].device_kind)
    hbm = f"{chip.memory_gib:g} GiB HBM, {chip.peak_tflops:g} TFLOP/s bf16 each" if chip else "unknown chip"
    print(f"topology {name}: {len(devices)} × {devices[0].device_kind} ({hbm}); mesh {tuple(config.mesh)}", flush=True)
    t0 = time.time()
    step = aot.compile_train_step(config, devices)
    print("\n".join(aot.step_report_lines(step)) + f"\n  (compiled in {time.time() - t0:.0f} s)", flush=True)
    if FLAGS.breakdown:
        t0 = time.time()
        parts = breakdown.compile_parts(config, devices)
        print("\n".join(breakdown.breakdown_lines(parts, step)) + f"\n  (compiled in {time.time() - t0:.0f} s)")
    if FLAGS.sampler and config.model.kind == "gmdit":
        t0 = time.time()
        sampler = aot.compile_sampler(
            config,
            devices,
            batch_per_device=FLAGS.sampler_batch_per_device,
            solver=FLAGS.solver,
            order=FLAGS.order,
            num_steps=FLAGS.num_steps,
            guided=FLAGS.guided,
        )
        what = f"{FLAGS.solver} order {FLAGS.order}, {FLAGS.num_steps} steps{', guided' if FLAGS.guided else ''}"
        print("\n".join(aot.sampler_report_lines(sampler, what)) + f"\n  (compiled in {time.time() - t0:.0f} s)")
        aot.check_fits(sampler, "sampler", aot.SAMPLER_LEVERS)
    aot.check_fits(step, "train step", aot.STEP_LEVERS)


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.aot", expected=(ValueError,))
