"""Test setup: 8 fake CPU devices (set before jax is imported), float32 matmuls, shared helpers.

The tests compile far more than they run (tiny shapes, one call each), so XLA's CPU backend skips
LLVM's optimisation passes (`--xla_backend_optimization_level=0`): compiles take ~40% less time; the
HLO-level passes (fusion, buffer assignment, so memory analyses) and float results are unchanged.
Subprocesses the tests start (the trainer CLI, notebooks) inherit the flags."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from hypothesis import settings  # noqa: E402

# Every example compiles new shapes: keep the count small and never time out on compilation.
settings.register_profile("jax", max_examples=4, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("jax")
