"""The sharded GMFlow trainer, as a library: ``train(config, workdir)``.

Modules: ``config`` (schema, validation, ``load_config``), ``state`` (train state, optimizer, sharded
init), ``step`` (loss and the pure train step), ``data`` (the global-batch stream), ``loop`` (the
loop, checkpoints, signals), ``preview`` (EMA sample grids), ``writers`` (clu writers without
TensorFlow). The command line is ``python -m gmflow_jax.train`` (``__main__``).
"""

from gmflow_jax.train.loop import TrainingError, train

__all__ = ["TrainingError", "train"]
