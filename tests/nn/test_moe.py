"""The MoE layer: both dispatch paths against the dense reference, the capacity rule, the statistics,
the balancing-bias update, and the config errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import get_default_config, validate_model
from hybrid_jax.nn import routing
from hybrid_jax.nn.moe import ExpertBias, MoE, default_moe_config

D_MODEL, TOKENS = 16, 24  # tokens of a [2, 12] batch


def moe_config(**overrides) -> ml_collections.ConfigDict:
    cfg = default_moe_config()
    cfg.update(dict(num_experts=4, mlp_dim=8, **overrides))
    return cfg


def relative_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def outputs_and_grads(layer: MoE, x: jax.Array, dispatch: str):
    """(y, dL/dx, dL/dparams) for L = sum(y * fixed cotangent), through `dispatch`."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    cotangent = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x, dispatch=dispatch)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads[1], nnx.to_pure_dict(grads[0])


# Routers x shared experts x top-1 / top-k, covered pairwise; the sigmoid cases also carry a
# non-zero balancing bias (which changes the choice) and a routed scaling factor.
CASES = [
    dict(router="softmax", experts_per_token=1, num_shared_experts=0, normalize_weights=False),
    dict(router="softmax", experts_per_token=2, num_shared_experts=1),
    dict(router="sigmoid", experts_per_token=1, num_shared_experts=1, bias_update_rate=0.1,
         routed_scaling_factor=2.5, normalize_weights=False),
    dict(router="sigmoid", experts_per_token=3, num_shared_experts=0, bias_update_rate=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['router']}-k{c['experts_per_token']}-s{c['num_shared_experts']}")
def test_dispatch_paths_equal_the_dense_reference(case):
    # capacity_factor E / k gives C = N: no expert can overflow, so nothing is dropped.
    cfg = moe_config(capacity_factor=4 / case["experts_per_token"], **case)
    layer = MoE(cfg, D_MODEL, rngs=nnx.Rngs(0))
    if layer.balance_bias is not None:
        layer.balance_bias[...] = jnp.array([0.3, -0.2, 0.0, 0.1])
    x = jax.random.normal(jax.random.key(1), (2, 12, D_MODEL))
    reference = outputs_and_grads(layer, x, "dense")
    for dispatch in ("dropless", "capacity"):
        result = outputs_and_grads(layer, x, dispatch)
        assert relative_error(result[0], reference[0]) < 1e-5, dispatch
        assert relative_error(result[1], reference[1]) < 1e-5, dispatch
        for path, grad in nnx.traversals.flatten_mapping(reference[2]).items():
            got = nnx.traversals.flatten_mapping(result[2])[path]
            if np.max(np.abs(grad)) > 0:
                assert relative_error(got, grad) < 1e-5, (dispatch, path)
            else:  # top-1 normalised weights are constant: the router has no output gradient
                assert np.max(np.abs(got)) == 0, (dispatch, path)
    assert np.max(np.abs(reference[2]["router"]["kernel"])) > 0 or not case.get("normalize_weights", True)


def kept_by_the_rule(experts: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
    """[N, k] bool: first choices of all tokens (in order) first, then second choices, each kept
    while its expert has room."""
    n, k = experts.shape
    kept, used = np.zeros((n, k), bool), np.zeros(num_experts, int)
    for rank in range(k):
        for token in range(n):
            expert = experts[token, rank]
            if used[expert] < capacity:
                kept[token, rank], used[expert] = True, used[expert] + 1
    return kept


def test_capacity_path_drops_exactly_the_assignments_past_capacity():
    k, num_experts = 2, 4
    x = jax.random.normal(jax.random.key(2), (TOKENS, D_MODEL))
    logits = jax.random.normal(jax.random.key(3), (TOKENS, num_experts)) + jnp.array([2.0, 1.0, 0.0, 0.0])
    plan = routing.route(logits, k=k, router="softmax", normalize=True)
    kernels = routing.ExpertKernels(*(0.3 * jax.random.normal(jax.random.key(i), shape) for i, shape in
                                      enumerate([(4, D_MODEL, 8), (4, D_MODEL, 8), (4, 8, D_MODEL)])))
    capacity = routing.expert_capacity(TOKENS, k, num_experts, 1.0)
    assert capacity == 12
    kept = kept_by_the_rule(np.asarray(plan.experts), num_experts, capacity)
    assert 0 < (~kept).sum() < kept.size / 2  # the skewed router overflows expert 0, not everything

    y, dropped = routing.capacity(x, plan, kernels, capacity_factor=1.0)
    masked = plan._replace(weights=jnp.where(kept, plan.weights, 0.0))  # dropped: no contribution
    assert relative_error(y, routing.dense_reference(x, masked, kernels)) < 1e-5
    assert float(dropped) == pytest.approx((~kept).mean(), abs=1e-7)
    _, kept_slots = routing.capacity_slots(plan.experts, num_experts, capacity)
    np.testing.assert_array_equal(np.asarray(kept_slots), kept.T.reshape(-1))


def test_statistics_match_their_formulas():
    logits = jax.random.normal(jax.random.key(4), (TOKENS, 4))
    plan = routing.route(logits, k=2, router="sigmoid", normalize=True)
    stats = routing.routing_stats(plan, 4)
    counts = np.bincount(np.asarray(plan.experts).reshape(-1), minlength=4)
    np.testing.assert_allclose(stats["load"], counts / (2 * TOKENS), rtol=1e-6)
    scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    probs = (scores / scores.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(stats["aux_loss"], 4 * np.sum(counts / (2 * TOKENS) * probs), rtol=1e-5)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(stats["z_loss"], np.mean(lse**2), rtol=1e-5)


def test_balancing_bias_is_not_a_parameter_and_moves_towards_the_mean_load():
    layer = MoE(moe_config(bias_update_rate=0.01), D_MODEL, rngs=nnx.Rngs(0))
    assert "balance_bias" not in nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    assert nnx.state(layer, ExpertBias)["balance_bias"][...].shape == (4,)
    layer.update_bias(jnp.array([0.5, 0.25, 0.25, 0.0]))
    np.testing.assert_allclose(layer.balance_bias[...], [-0.01, 0.0, 0.0, 0.01])
    _, stats = layer(jnp.ones((1, 3, D_MODEL)))
    assert stats["penalty"] == 0.0  # both loss weights default to 0


def _moe_model(**moe):
    config = get_default_config().model
    config.update(dict(d_model=16, num_layers=2, pattern="A", ffn="moe"))
    config.moe.update(moe)
    return config


@pytest.mark.parametrize("change, message", [
    (dict(experts_per_token=9), r"model\.moe\.experts_per_token: 9 must be <= num_experts \(8\)"),
    (dict(num_experts=0, num_shared_experts=1), r"model\.moe\.num_experts: is 0 but num_shared_experts=1"),
    (dict(capacity_factor=0.0), r"model\.moe\.capacity_factor: must be a number > 0, got 0\.0"),
    (dict(router="relu"), r"model\.moe\.router: 'relu' is not valid; valid values are \['softmax', 'sigmoid'\]"),
    (dict(dispatch="sorted"), r"model\.moe\.dispatch: 'sorted' is not valid"),
])
def test_bad_moe_configs_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        validate_model(_moe_model(**change))


def test_bad_moe_layer_rules_name_the_key():
    config = _moe_model()
    config.update(dict(num_layers=6, pattern="AAA"))
    config.moe_layers.every = 2
    with pytest.raises(ValueError, match=r"model\.moe_layers\.every: 2 must divide the pattern period 3"):
        validate_model(config)
    config.moe_layers.update(dict(every=1, first_dense_layers=6))
    with pytest.raises(ValueError, match=r"model\.moe_layers: selects no MoE layer among the 6 layers"):
        validate_model(config)
