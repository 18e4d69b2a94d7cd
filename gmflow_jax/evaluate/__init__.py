"""Evaluation of a checkpoint: samples in the ADM format, their features, and the metrics.

    python -m gmflow_jax.evaluate --workdir DIR --out DIR [--guidance a,b,...] [--ref FILE] [--inception FILE]

* :mod:`~gmflow_jax.evaluate.sampling`: draws the samples of one solver setting for a guidance sweep, sharded
  over processes, resumable (``samples.npz`` per setting, ``metrics.json`` rows).
* :mod:`~gmflow_jax.evaluate.metrics`: FID / sFID, IS, Precision/Recall, saturation and the reference-batch
  format, from features, with the ADM evaluator's conventions.
"""
