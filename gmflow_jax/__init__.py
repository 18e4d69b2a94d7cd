"""GMFlow (Gaussian Mixture Flow Matching) in JAX/Flax.

The math core is ``gm``, ``flow``, ``losses`` and ``solvers`` (pure jittable functions, formulas in
``docs/method.md``); ``models`` holds the networks, ``train`` the sharded trainer, ``sampling`` the
``Sampler`` (the Colab API), ``checkpoint`` the one checkpoint seam. See ``docs/design.md``.
"""
