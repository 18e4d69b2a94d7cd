"""Experiment configs: ``get_config(arg=None)`` files, installed as ``gmflow_jax.configs``.

Load one with ``gmflow_jax.train.config.load_config('digits_gmdit')`` or ``--config digits_gmdit``.
"""
