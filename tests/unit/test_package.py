"""Package boundaries: the sampler (the Colab API) imports neither the trainer nor the data pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("grain", "tensorflow_datasets", "array_record", "tensorflow", "clu")
TRAINER = ("gmflow_jax.train", "gmflow_jax.data", "gmflow_jax.demo")


def imported_after(statement: str) -> list[str]:
    """The modules loaded by ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sampler_imports_no_trainer_or_data_module():
    modules = imported_after("from gmflow_jax.sampling import Sampler")
    assert "gmflow_jax.checkpoint" in modules and "gmflow_jax.solvers" in modules  # the check can see imports
    bad = [m for m in modules if m.split(".")[0] in HEAVY or m.startswith(TRAINER)]
    assert bad == [], bad


def test_math_core_imports_no_flax_or_orbax():
    modules = imported_after("import gmflow_jax.gm, gmflow_jax.flow, gmflow_jax.losses, gmflow_jax.solvers")
    bad = [m for m in modules if m.split(".")[0] in ("flax", "orbax", *HEAVY) or m.startswith(TRAINER)]
    assert bad == [], bad


def test_importing_the_library_defines_no_flags():
    """Flags live in the ``__main__`` modules only: importing a package (Colab, tests) registers none."""
    code = (
        "import gmflow_jax.train, gmflow_jax.sampling, gmflow_jax.demo, gmflow_jax.cli, gmflow_jax.evaluate.reference\n"
        "import json\n"
        "from absl import flags\n"
        "print(json.dumps(sorted(flags.FLAGS.flags_by_module_dict())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert any(m.startswith("absl") for m in modules)  # the check sees flag-defining modules
    assert [m for m in modules if "gmflow_jax" in m] == []


def test_evaluation_imports_no_torch_trainer_or_data_module():
    """torch is a test reference only: the FID Inception reads its weights without it."""
    modules = imported_after(
        "import gmflow_jax.evaluate.inception, gmflow_jax.evaluate.reference, gmflow_jax.evaluate.scoring, "
        "gmflow_jax.evaluate.plots, gmflow_jax.evaluate.torch_weights"
    )
    assert "gmflow_jax.evaluate.inception" in modules
    bad = [m for m in modules if m.split(".")[0] in ("torch", "torchvision", *HEAVY) or m.startswith(TRAINER)]
    assert bad == [], bad
