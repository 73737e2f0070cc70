"""pallas_kernels.gated_recurrence / supports: backend resolution, limits reported as ValueErrors that
name them, and the compiled (non-interpret) kernels lowering to Triton (H200) and Mosaic (TPU) from
this CPU machine, forward and backward."""
import warnings

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import api
from pallas_kernels.chunk_math import KernelConfig
from pallas_kernels.recurrence import chunked_recurrence

B, T, H = 1, 40, 2


def shapes(k_dim=16, v_dim=16, *, gate="channel", delta=True):
    """ShapeDtypeStructs for (q, k, v, g, beta, state): `supports` only reads shapes."""
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    qk = f32(B, T, H, k_dim)
    g = {None: None, "scalar": f32(B, T, H, 1), "channel": f32(B, T, H, k_dim)}[gate]
    return qk, qk, f32(B, T, H, v_dim), g, f32(B, T, H) if delta else None, f32(B, H, k_dim, v_dim)


def test_defaults_on_cpu_use_the_interpreted_gpu_variant():
    assert jax.devices()[0].platform == "cpu"
    assert api._resolve_backend(None, None) == ("gpu", True)
    assert api._resolve_backend("tpu", None) == ("tpu", True)
    assert pallas_kernels.supports(*shapes(), chunk_size=64) == (True, "")
    assert pallas_kernels.supports(*shapes(8, 24, gate=None), chunk_size=8, backend="tpu") == (True, "")


@pytest.mark.parametrize("args,kwargs,message", [
    (shapes(20, 16), dict(chunk_size=16), "head dim K=20 must be a multiple of 16 for the GPU kernel"),
    (shapes(16, 40), dict(chunk_size=16), "head dim V=40 must be a multiple of 16 for the GPU kernel"),
    (shapes(512, 16), dict(chunk_size=16), "head dim K=512 must be <= 256 for the GPU kernel"),
    (shapes(), dict(chunk_size=24), "chunk_size=24 must be a power of two in [16, 128] for the GPU kernel"),
    (shapes(), dict(chunk_size=16, block_v=8), "block_v=8 must be a power of two >= 16"),
    (shapes(12, 16), dict(chunk_size=16, backend="tpu"), "head dim K=12 must be a multiple of 8 for the TPU"),
    (shapes(16, 200), dict(chunk_size=16, backend="tpu"), "V=200 must be a multiple of 128 when V > 128"),
    (shapes(), dict(chunk_size=12, backend="tpu"), "chunk_size=12 must be a multiple of 8 in [8, 512]"),
    (shapes(16, 256), dict(chunk_size=16, backend="tpu", block_v=64), "block_v=64 must be V=256 or a multiple"),
    (shapes(), dict(chunk_size=16, backend="cuda"), "backend must be one of ['gpu', 'tpu']"),
    (shapes(), dict(chunk_size=16, interpret=False), "pass interpret=True"),
    (shapes(), dict(chunk_size=16.0), "chunk_size must be an int"),
])
def test_limits_are_named(args, kwargs, message):
    ok, reason = pallas_kernels.supports(*args, **kwargs)
    assert not ok and message in reason
    arrays = [None if a is None else jnp.zeros(a.shape, a.dtype) for a in args]
    with pytest.raises(ValueError, match=None) as err:
        pallas_kernels.gated_recurrence(*arrays, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("bad,message", [
    ({"k": (B, T, H, 8)}, "k must have shape [B, T, H, K] = (1, 40, 2, 16)"),
    ({"v": (B, T + 1, H, 16)}, "v must have shape [B, T, H, V] with B, T, H = (1, 40, 2)"),
    ({"g": (B, T, H, 3)}, "g must have shape [B, T, H, K] = (1, 40, 2, 16) or [B, T, H, 1]"),
    ({"beta": (B, T, H, 1)}, "beta must have shape [B, T, H] = (1, 40, 2)"),
    ({"state": (B, H, 16, 8)}, "state must have shape [B, H, K, V] = (1, 2, 16, 16)"),
    ({"q": (B, T, 16)}, "q must have shape [B, T, H, K]"),
])
def test_bad_shapes_are_named(bad, message):
    names = ["q", "k", "v", "g", "beta", "state"]
    args = [jnp.zeros(bad.get(n, s.shape)) for n, s in zip(names, shapes())]
    with pytest.raises(ValueError) as err:
        pallas_kernels.gated_recurrence(*args, chunk_size=16)
    assert message in str(err.value)


def _abstract_target(backend):
    """An abstract mesh on an H200 / TPU v5e, so jit lowers the compiled kernels on this CPU."""
    sharding = jax.sharding
    if not all(hasattr(sharding, n) for n in ("AbstractDevice", "AbstractMesh", "use_abstract_mesh")):
        pytest.skip("this jax cannot lower for an abstract device")
    kind, platform = {"gpu": ("NVIDIA H200", "gpu"), "tpu": ("TPU v5 lite", "tpu")}[backend]
    device = sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    mesh = sharding.AbstractMesh((1,), ("x",), (sharding.AxisType.Explicit,), abstract_device=device)
    return sharding.use_abstract_mesh(mesh), ("cuda" if backend == "gpu" else "tpu")


@pytest.mark.parametrize("backend,k_dim,v_dim,block_v", [("gpu", 128, 128, 32), ("tpu", 128, 256, 128)])
@pytest.mark.parametrize("delta", [True, False])
def test_compiled_kernels_lower(backend, k_dim, v_dim, block_v, delta):
    """Forward and gradient lower to Triton / Mosaic custom calls (lowering rules, block shapes)."""
    mesh_context, platform = _abstract_target(backend)
    bh, n, chunk = 2, 3, 64
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    qk, g = f32(bh, n, chunk, k_dim), f32(bh, n, chunk, k_dim)
    inputs = (qk, qk, f32(bh, n, chunk, v_dim), g) + ((f32(bh, n, chunk),) if delta else ())
    s0 = f32(bh, k_dim, v_dim)
    run = chunked_recurrence
    config = KernelConfig(chunk, backend, False, block_v)

    def loss(inputs, s0):
        o, final = run(config, inputs, s0)
        return jnp.sum(o) + jnp.sum(final)

    kernel_call = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        with mesh_context:
            forward = jax.jit(lambda i, s: run(config, i, s)).trace(inputs, s0).lower(
                lowering_platforms=(platform,)).as_text()
            backward = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(inputs, s0).lower(
                lowering_platforms=(platform,)).as_text()
    assert forward.count(kernel_call) == 1
    assert backward.count(kernel_call) >= 2  # the forward with entering states, and the reverse pass
