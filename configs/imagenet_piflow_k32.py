"""The authors' 1-NFE pi-Flow ImageNet 256² recipe (``gmdit_k32_imagenet_piid_1step_8gpus``): a GM-DiT
XL/2 student with K = 32, distilled by pi-ID (docs/method.md §10) from an ImageNet teacher.

Student: the teacher's XL/2 trunk, K = 32, log-std head of inner width 1024 (2 layers), started from
the teacher's weights (its GM head tiled); bf16 compute, remat policy 'none' (the teacher recipe's: 56.6
of 95 GiB per chip on v5p-64 beside the teacher, 4 % faster than 'minimal', docs/benchmarks.md), FSDP.
pi-ID: 1 NFE, 128 sub-steps, 2 intermediate states, GM dropout 0.05, loss scale 3; teacher guidance 2.7 on σ ∈ [0, 0.6]
(the authors' teacher is a flow-matching DiT: CFG 2.7; a GMFlow teacher reads ``distill.guidance`` as
w̃ ∈ [0, 1), e.g. ``--config.distill.guidance=0.3``). AdamW 5e-5 (the authors use 8-bit AdamW),
betas (0.9, 0.95), no weight decay, 400-step warm-up, gradient clip 50 from step 400, batch 4096,
140K iterations; the authors' power EMA (Karras et al.; γ = 7, a copy of the weights up to step 400,
method.md §9).

    python -m gmflow_jax.train --config imagenet_piflow_k32 --workdir gs://BUCKET/piflow_k32 \\
        --config.distill.teacher=gs://BUCKET/gmflow_k8 --config.model.vae=... --config.data.data_dir=...
    python -m gmflow_jax.aot --config imagenet_piflow_k32 --topology v5p-64   # teacher + student fit?

``distill.teacher_config`` names the teacher's architecture for the ahead-of-time compile when no teacher
workdir is given: the flow-matching XL/2 (``imagenet_gmdit_k8:fm``), as the authors'. ``get_config('2')``:
2 NFE.
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train.config import load_config

VARIANTS = ("1", "2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / '1' (1 NFE) or '2'."""
    variant = arg or "1"
    if variant not in VARIANTS:
        raise ValueError(f"imagenet_piflow_k32 variant must be one of {VARIANTS}; got {arg!r}.")
    c = load_config("imagenet_gmdit_k8")
    c.num_steps = 140_000
    c.model.num_gaussians = 32
    c.model.logstd_inner_dim = 1024
    c.model.spectrum = False
    c.loss.spectral_weight = 0.0
    c.optim.update(lr=5e-5, b1=0.9, b2=0.95, weight_decay=0.0, warmup_steps=400, clip_norm=50.0, clip_start=400)
    c.ema.update(kind="power", gamma=7.0, start_step=400)
    c.checkpoint.every_steps = 2000
    c.distill.update(
        nfe=int(variant),
        teacher_config="imagenet_gmdit_k8:fm",
        total_substeps=128,
        num_intermediate_states=2,
        gm_dropout=0.05,
        guidance=2.7,
        guidance_interval=(0.0, 0.6),
        orthogonal=0.0,
        scale=3.0,
    )
    return c
