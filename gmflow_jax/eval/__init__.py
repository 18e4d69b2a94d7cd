"""Evaluation: metrics (FID, sFID, IS, Precision/Recall, saturation) and the ADM reference-batch format.

The metrics live in :mod:`gmflow_jax.eval.metrics`; they follow the conventions of the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``) so that numbers are comparable with the paper's.
"""
