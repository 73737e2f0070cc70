"""Importing hybrid_jax, hybrid_jax.ops or hybrid_jax.config loads no Triton or Mosaic module; the
Pallas kernels load when an impl resolves to them (impl="pallas"; "auto" only on a GPU / TPU).
Each check runs in a fresh interpreter and reads `sys.modules`."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
# The backends and their lowerings. Not listed: jax._src.pallas.core and the interpret-mode parameter
# classes it imports (jax._src.pallas.mosaic.interpret.params, ...), which flax loads by itself.
KERNEL_MODULES = (
    "jax.experimental.pallas.triton", "jax.experimental.pallas.tpu", "jax.experimental.pallas.mosaic_gpu",
    "jax.experimental.mosaic", "jax._src.pallas.triton", "jax._src.pallas.mosaic.lowering",
    "jax._src.pallas.mosaic.pallas_call_registration", "jax._src.pallas.mosaic_gpu.lowering",
    "pallas_kernels.api", "pallas_kernels.gpu", "pallas_kernels.tpu",
)


def _run(body: str) -> dict:
    """Runs `body` in a fresh CPU interpreter; `loaded()` there lists the kernel modules imported so far.
    Returns the JSON object the body prints last."""
    prelude = textwrap.dedent(f"""
        import json, sys
        KERNEL_MODULES = {KERNEL_MODULES!r}
        def loaded():
            return sorted(m for m in sys.modules if m.startswith(KERNEL_MODULES))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_package_loads_no_kernel_module():
    seen = _run("""
        seen = {}
        for name in ("hybrid_jax", "hybrid_jax.ops", "hybrid_jax.config"):
            __import__(name)
            seen[name] = loaded()
        print(json.dumps(seen))
    """)
    assert seen == {"hybrid_jax": [], "hybrid_jax.ops": [], "hybrid_jax.config": []}


def test_impl_pallas_loads_the_kernels_and_auto_on_cpu_does_not():
    seen = _run("""
        import jax, jax.numpy as jnp
        from hybrid_jax import ops
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v = (jax.random.normal(key, (1, 16, 1, 16)) for key in keys[:3])
        g = -jax.nn.softplus(jax.random.normal(keys[3], (1, 16, 1, 16)))
        beta = jnp.full((1, 16, 1), 0.5)
        ops.kda(q, k, v, g=g, beta=beta, impl="auto", chunk_size=16)
        after_auto = loaded()
        o = ops.kda(q, k, v, g=g, beta=beta, impl="pallas", chunk_size=16)[0]
        reference = ops.kda(q, k, v, g=g, beta=beta, impl="reference")[0]
        print(json.dumps({"auto": after_auto, "pallas": loaded(),
                          "error": float(jnp.max(jnp.abs(o - reference)))}))
    """)
    assert seen["auto"] == []
    for module in ("pallas_kernels.api", "pallas_kernels.gpu.state_pass", "pallas_kernels.tpu.state_pass",
                   "jax.experimental.pallas.triton", "jax.experimental.pallas.tpu"):
        assert module in seen["pallas"], module
    assert seen["error"] < 1e-4
