"""Context parallelism through HybridLM: with the time axis split over the "context" mesh axis (2, 4 or
8 shards, combined with data and tensor axes) a forward and backward equal the 1-device result (loss
and gradients, 1e-5 relative), with and without packed documents.

Each case is one model (`union_model`): a layer of every distinct mixer config of every experiment
config (their mixers and their MoE and dense feed-forwards; the configs in two halves) and one of
every mixer kind no config uses (`UNCONFIGURED_KINDS`). Gradient errors are relative to the whole
gradient's norm (and each parameter's within LEAF_RTOL). Every chunked mixer runs with
chunks of one shard's length in both runs, so they cut time alike and differ only in how states pass
between shards (float32 sums in another order).
"""
from __future__ import annotations

import glob
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from hybrid_jax.config import load_config, mixer
from hybrid_jax.models.hybrid_lm import build_model
from tests.nn.test_packed_mixers import UNCONFIGURED_KINDS
from tests.nn.test_mixers import SMALL
from tests.train.helpers import ROOT

# One parameter's gradient is a sum over every token whose terms nearly cancel for some (the decay
# parameters): on one device, chunks of 4 vs 32 tokens (both exact) already differ by up to 3e-5 in
# such a leaf of these models (kimi_linear), while the whole gradient agrees to 1e-5.
LEAF_RTOL = 5e-5


def _segments(t: int) -> np.ndarray:
    """Row 0: documents crossing shard boundaries at any split, one starting exactly at t / 2, then
    padding; row 1: one document."""
    ids = np.ones((2, t), np.int32)
    ids[0, 5:] = 2
    ids[0, t // 2:] = 3
    ids[0, t // 2 + 3:] = 4
    ids[0, t - 2:] = 0
    return ids


def _mesh(data: int, context: int, tensor: int):
    devices = jax.devices()[: data * context * tensor]
    return jax.make_mesh((data, context, tensor), ("data", "context", "tensor"),
                         axis_types=(AxisType.Auto,) * 3, devices=devices)


def _loss_and_grads(model, tokens, segment_ids, mesh=None):
    graphdef, params = nnx.split(model)

    def loss(params):
        documents = {} if segment_ids is None else {"segment_ids": segment_ids}
        logits = nnx.merge(graphdef, params)(tokens, **documents).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
        weight = jnp.ones_like(nll) if segment_ids is None else (segment_ids[:, 1:] != 0).astype(jnp.float32)
        return jnp.sum(nll * weight) / jnp.sum(weight)

    step = jax.jit(jax.value_and_grad(loss))
    if mesh is None:
        return step(params)
    rows = NamedSharding(mesh, P("data", "context"))
    tokens = jax.device_put(tokens, rows)
    segment_ids = None if segment_ids is None else jax.device_put(segment_ids, rows)
    with jax.set_mesh(mesh):
        return step(params)


def _check(model_cfg, *, t, data, context, tensor, packed):
    """Builds the model with every chunked mixer's chunk as long as one shard, so that both runs cut
    time into the same chunks and differ only in how the states pass between them."""
    for cfg in model_cfg.mixers.values():
        if "chunk_size" in cfg:
            cfg.chunk_size = t // context
    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, t), 0, model.vocab_size)
    segment_ids = jnp.asarray(_segments(t)) if packed else None
    loss_1, grads_1 = _loss_and_grads(model, tokens, segment_ids)
    loss_n, grads_n = _loss_and_grads(model, tokens, segment_ids, _mesh(data, context, tensor))
    np.testing.assert_allclose(float(loss_n), float(loss_1), rtol=1e-5)
    leaves_1, leaves_n = jax.tree.leaves(grads_1), jax.tree.leaves(grads_n)
    norm = lambda leaves: float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)))  # noqa: E731
    whole = norm([g_n - g_1 for g_n, g_1 in zip(leaves_n, leaves_1)]) / norm(leaves_1)
    assert whole <= 1e-5, f"gradient (all parameters): relative error {whole:.3g} > 1e-5"
    for (path, g_1), g_n in zip(jax.tree_util.tree_leaves_with_path(grads_1), leaves_n):
        err = float(jnp.linalg.norm(g_n - g_1) / (jnp.linalg.norm(g_1) + 1e-30))
        assert err <= LEAF_RTOL, f"gradient {jax.tree_util.keystr(path)}: relative error {err:.3g} > {LEAF_RTOL}"


def union_model(names=(), kinds=()):
    """One tiny model holding a layer of every distinct mixer config of the experiment configs `names`
    (one per letter of their patterns, identical ones once) and of every kind in `kinds` (tests/nn/
    test_mixers.py's small settings), a dense feed-forward in the first layer and MoE after. One model per case
    keeps the compile time of the cases near that of their layers."""
    model_cfg = load_config(f"{ROOT}/experiments/configs/kimi_linear_moe.py:tiny").model
    mixers = {}
    for name in names:
        config = load_config(f"{ROOT}/experiments/configs/{name}.py:tiny").model
        for letter in dict.fromkeys(config.pattern):
            mixers.setdefault(config.mixers[letter].to_json(), config.mixers[letter])
    for kind in kinds:
        mixers.setdefault(kind, mixer(kind, **SMALL.get(kind, {})))
    letters = string.ascii_uppercase[: len(mixers)]
    model_cfg.mixers = dict(zip(letters, mixers.values()))
    model_cfg.pattern, model_cfg.num_layers = letters, len(letters)
    model_cfg.moe_layers.first_dense_layers, model_cfg.moe_layers.every, model_cfg.moe_layers.offset = 1, 1, 0
    return model_cfg


CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{ROOT}/experiments/configs/*.py")
                 if not p.endswith("__init__.py"))
# (experiment configs, other kinds, tokens per row, data, context, tensor, packed documents)
# Two halves of the configs: a model of all of them (13 layers) sums float32 noise up to ~1e-5.
CASES = [
    (CONFIGS[:6], (), 64, 2, 4, 1, True),  # T / 4 = 16: kda_sparse's blocks of 16 stay whole
    (CONFIGS[6:], (), 64, 1, 8, 1, False),
    ((), UNCONFIGURED_KINDS, 32, 2, 2, 2, True),
]


@pytest.mark.parametrize("names,kinds,t,data,context,tensor,packed", CASES,
                         ids=["configs-first-half", "configs-second-half", "other-kinds"])
def test_context_parallel_equals_one_device(names, kinds, t, data, context, tensor, packed):
    _check(union_model(names, kinds), t=t, data=data, context=context, tensor=tensor, packed=packed)
