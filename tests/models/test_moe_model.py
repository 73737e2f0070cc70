"""HybridLM with MoE layers: which layers are MoE (lead and scanned periods), the per-layer
statistics, dispatch paths at the model level, and decoding through MoE layers.

(Every experiment config, the MoE ones included, is also decoded in
tests/inference/test_model_decoding.py.)"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import get_default_config, load_config, mixer
from hybrid_jax.models import build_model
from tests.inference.helpers import B, TOTAL, check_decoding, compile_fast, init_fast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _abstract(family: str, **model):
    config = load_config(os.path.join(ROOT, "experiments", "configs", f"{family}.py") + ":tiny")
    config.model.update(model)
    return config, nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))


def test_first_dense_layers_make_lead_periods_and_one_scanned_period():
    config, model = _abstract("kimi_linear_moe", num_layers=12)  # KKKM x 3, layer 0 dense
    assert model.ffn_kinds == ("swiglu",) + ("moe",) * 11 and model.num_lead == 1
    lead = model.lead_periods[0].blocks
    assert not hasattr(lead[0].ffn, "router")
    assert all(block.ffn.gate.kernel.shape == (8, 64, 64) for block in lead[1:])
    # The other 8 layers: one period's blocks, stacked twice, all MoE.
    experts = config.model.moe.num_experts
    assert [block.ffn.gate.kernel.shape[:2] for block in model.periods.blocks] == [(2, experts)] * 4
    assert [block.ffn.balance_bias.shape for block in model.periods.blocks] == [(2, experts)] * 4


def test_every_other_layer_rule_needs_no_lead_period():
    _, model = _abstract("jamba_moe")  # MMMMAMMM, MoE on odd layers
    assert model.num_lead == 0 and model.ffn_kinds == ("swiglu", "moe") * 4
    assert [hasattr(block.ffn, "router") for block in model.periods.blocks] == [False, True] * 4


def _tiny_moe(dispatch: str, num_layers: int = 3):
    config = get_default_config().model
    config.update(dict(vocab_size=64, d_model=16, num_layers=num_layers, pattern="A", ffn="moe", mlp_dim=24))
    config.mixers = {"A": mixer("attention", num_heads=2, num_kv_heads=1)}
    config.moe.update(dict(num_experts=4, experts_per_token=2, num_shared_experts=1, mlp_dim=8, router="sigmoid",
                           bias_update_rate=0.1, dispatch=dispatch, capacity_factor=2.0))
    config.moe_layers.first_dense_layers = 1
    return config


def test_forward_reports_every_moe_layer_and_both_paths_agree():
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    outputs = {}
    for dispatch in ("dropless", "capacity"):
        model = init_fast(lambda: build_model(_tiny_moe(dispatch), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        forward = compile_fast(lambda s, t: nnx.merge(graphdef, s).forward(t), state, tokens)
        outputs[dispatch] = forward(state, tokens)
        layers = model.moe_layer_stats(outputs[dispatch][1])
        assert [layer for layer, _ in layers] == [1, 2]  # layer 0 dense (lead), 1 and 2 scanned
        for _, stats in layers:
            assert float(jnp.sum(stats["load"])) == pytest.approx(1.0) and float(stats["dropped"]) == 0.0
    scale = float(jnp.max(jnp.abs(outputs["dropless"][0])))
    np.testing.assert_allclose(outputs["capacity"][0], outputs["dropless"][0], atol=1e-5 * scale)


def test_decoding_through_moe_layers_equals_forward():
    """Trained on the capacity path (C large enough to drop nothing), decoded dropless; with a
    non-zero balancing bias, which must steer decoding's choice exactly as the forward's."""
    model = init_fast(lambda: build_model(_tiny_moe("capacity"), rngs=nnx.Rngs(0)))
    for block in model.periods.blocks:
        block.ffn.balance_bias[...] = jnp.tile(jnp.array([0.2, -0.1, 0.0, 0.05]), (2, 1))
    tokens = jax.random.randint(jax.random.key(2), (B, TOTAL), 0, 64)
    cache = check_decoding(model, tokens, uniform_prompts=False)
    assert len(cache.lead) == 1 and all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(cache.layers))
