"""Context parallelism through HybridLM: with the time axis split over the "context" mesh axis (2, 4 or
8 shards, combined with data and tensor axes) a forward and backward equal the 1-device result (loss
and gradients, 1e-5 relative), with and without packed documents.

Every experiment config runs once across `CONFIG_CASES` (one layer per distinct mixer of its
pattern: `one_layer_per_mixer`), and the mixer kinds no config uses
(`UNCONFIGURED_KINDS`) run in two-layer models in `KIND_CASES`. Gradient errors are relative to
the whole gradient's norm (and each parameter's within LEAF_RTOL). Every chunked mixer runs with
chunks of one shard's length in both runs, so they cut time alike and differ only in how states pass
between shards (float32 sums in another order).
"""
from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from hybrid_jax.config import ffn_plan, load_config, mixer
from hybrid_jax.models.hybrid_lm import build_model
from tests.nn.test_packed_mixers import UNCONFIGURED_KINDS
from tests.nn.test_mixers import SMALL
from tests.train.helpers import ROOT

T = 32
# One parameter's gradient is a sum over every token whose terms nearly cancel for some (the decay
# parameters): on one device, chunks of 4 vs 32 tokens (both exact) already differ by up to 3e-5 in
# such a leaf of these models (kimi_linear), while the whole gradient agrees to 1e-5.
LEAF_RTOL = 5e-5


def _segments(t: int) -> np.ndarray:
    """Row 0: documents crossing shard boundaries at any split, one starting exactly at T / 2, then
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


def _check(model_cfg, *, data, context, tensor, packed):
    """Builds the model with every chunked mixer's chunk as long as one shard, so that both runs cut
    time into the same chunks and differ only in how the states pass between them."""
    for cfg in model_cfg.mixers.values():
        if "chunk_size" in cfg:
            cfg.chunk_size = T // context
    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, model.vocab_size)
    segment_ids = jnp.asarray(_segments(T)) if packed else None
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


# (config, data, context, tensor, packed documents)
CONFIG_CASES = [
    ("kimi_linear", 1, 8, 1, True),
    ("kimi_linear_moe", 2, 2, 2, False),
    ("gated_deltanet", 2, 4, 1, False),
    ("mamba2", 1, 2, 2, True),
    ("transformer", 2, 2, 2, True),
    ("samba", 1, 4, 2, False),
    ("griffin", 2, 4, 1, True),
    ("jamba", 1, 4, 1, True),
    ("jamba_moe", 1, 2, 2, False),
    ("deepseek", 1, 2, 1, True),
    ("kda_sparse", 1, 2, 1, True),  # blocks of 16 tokens: shards of T / 2
    ("loglinear", 2, 4, 1, True),
]


def test_config_cases_cover_every_experiment_config():
    names = {os.path.basename(p)[:-3] for p in glob.glob(f"{ROOT}/experiments/configs/*.py")} - {"__init__"}
    assert sorted(name for name, *_ in CONFIG_CASES) == sorted(names)


def one_layer_per_mixer(model_cfg):
    """`model_cfg` with one layer per distinct mixer of its pattern, repeated only as often as it takes
    to keep every feed-forward kind (MoE after leading dense layers): every mixer config and FFN kind
    it has, at the compile time of the fewest layers (the repeated layers of a period add nothing a
    split could get wrong)."""
    kinds = set(ffn_plan(model_cfg))
    model_cfg.pattern = "".join(dict.fromkeys(model_cfg.pattern))
    model_cfg.num_layers = len(model_cfg.pattern)
    while set(ffn_plan(model_cfg)) != kinds:
        model_cfg.num_layers += len(model_cfg.pattern)
    return model_cfg


@pytest.mark.parametrize("name,data,context,tensor,packed", CONFIG_CASES)
def test_config_context_parallel_equals_one_device(name, data, context, tensor, packed):
    config = load_config(f"{ROOT}/experiments/configs/{name}.py:tiny")
    _check(one_layer_per_mixer(config.model), data=data, context=context, tensor=tensor, packed=packed)


# (two mixer kinds, data, context, tensor, packed documents)
KIND_CASES = [
    (("deltanet", "gla"), 1, 8, 1, True),
    (("linear_attention", "qla"), 2, 2, 1, False),
    (("lolcats", "nsa"), 1, 4, 1, True),
    (("loglinear_kda", "loglinear_mamba2"), 1, 4, 2, True),
]


def test_kind_cases_cover_every_unconfigured_kind():
    assert sorted(kind for kinds, *_ in KIND_CASES for kind in kinds) == UNCONFIGURED_KINDS


@pytest.mark.parametrize("kinds,data,context,tensor,packed", KIND_CASES)
def test_unconfigured_kinds_context_parallel_equal_one_device(kinds, data, context, tensor, packed):
    config = load_config(f"{ROOT}/experiments/configs/transformer.py:tiny")
    config.model.pattern, config.model.num_layers = "ab", 2
    config.model.mixers = {letter: mixer(kind, **SMALL.get(kind, {})) for letter, kind in zip("ab", kinds)}
    _check(config.model, data=data, context=context, tensor=tensor, packed=packed)
