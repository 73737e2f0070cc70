"""The loop's parts: sharding rules, optimiser masks and schedule, steps, metrics files, config checks."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_jax.config import validate
from hybrid_jax.train import ConfigError, MetricsBuffer, MetricsLogger, read_metrics, train
from hybrid_jax.train import mesh as mesh_lib
from hybrid_jax.train.optim import decays, learning_rate_schedule
from hybrid_jax.train.state import build_train_setup
from hybrid_jax.train.step import make_train_step
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def mesh_2x2x2(corpus):
    config = tiny_config(corpus, mesh=(2, 2, 2, 1, 1))
    return config, mesh_lib.make_mesh(config.mesh), mesh_lib.axis_rules(config.mesh)


@pytest.mark.parametrize(
    "logical, shape, expected",
    [
        (("embed", "mlp"), (64, 192), P("fsdp", "tensor")),
        (("layers", "embed", "heads", "kv"), (2, 64, 4, 16), P(None, "fsdp", "tensor", None)),
        (("layers", "embed", "heads", "kv"), (2, 64, 3, 16), P(None, "fsdp", None, None)),  # 3 % 2
        (("embed", "embed"), (64, 64), P("fsdp", None)),  # a mesh axis splits an array once
        (("batch", None), (8, 32), P(("data", "fsdp"), None)),
        (("no_such_axis", "vocab"), (6, 256), P(None, "tensor")),  # no rule: replicated
    ],
)
def test_logical_axes_map_to_mesh_axes(mesh_2x2x2, logical, shape, expected):
    _, mesh, rules = mesh_2x2x2
    assert mesh_lib.logical_to_mesh_spec(logical, shape, rules, mesh) == expected


def test_mesh_shape_resolution_and_errors():
    assert mesh_lib.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert mesh_lib.resolve_mesh_shape((1, 1, -1), 8) == (1, 1, 8)
    with pytest.raises(ValueError, match=r"mesh.shape: \(3, -1, 1\): the fixed axes \(3 devices\) do not divide the 8"):
        mesh_lib.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match=r"mesh.shape: \(2, 2, 1\) needs 4 devices but 8 are available"):
        mesh_lib.resolve_mesh_shape((2, 2, 1), 8)


def test_state_shardings_follow_the_rules_and_decay_skips_norms(mesh_2x2x2):
    config, mesh, rules = mesh_2x2x2
    setup = build_train_setup(config, mesh, rules)  # abstract: nothing runs
    params = setup.abstract_state.params
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    block = params["periods"]["blocks"][0]
    assert block["ffn"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    adam = setup.abstract_state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert adam.mu["embed"]["embedding"].sharding == params["embed"]["embedding"].sharding
    assert adam.count.sharding.spec == P()
    roles = setup.param_roles  # declared by the layers; tests/train/test_weight_decay.py checks them all
    assert decays(roles["embed"]["embedding"]) and decays(roles["periods"]["blocks"][0]["mixer"]["q_proj"]["kernel"])
    assert not decays(roles["embed"]["embedding"], decay_embeddings=False)
    assert not decays(roles["final_norm"]["scale"]) and not decays(roles["periods"]["blocks"][0]["ffn_norm"]["scale"])


def test_schedule_warms_up_from_the_first_update_and_ends_at_the_floor(corpus):
    train_cfg = tiny_config(corpus, learning_rate=1.0, min_learning_rate_ratio=0.1, warmup_steps=4, steps=10).train
    lr = [float(learning_rate_schedule(train_cfg)(count)) for count in range(10)]
    np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * (s - 4) / 6)) / 2 for s in range(5, 11)]
    np.testing.assert_allclose(lr[4:], cosine, rtol=1e-5)


def _step_runs(config, mesh, rules, batches, steps=2):
    """For each of `batches`: (state, per-step metrics) after `steps` steps from the same initial state.

    One train step is built for all of them, so a test comparing batches compiles it once."""
    setup = build_train_setup(config, mesh, rules)
    batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec(rules))
    step = make_train_step(setup.graphdef, setup.optimizer, state_shardings=setup.state_shardings,
                           batch_sharding=batch_sharding, grad_accum_steps=config.train.grad_accum_steps)
    runs = []
    for batch in batches:
        state, out = setup.init_state(0), []
        for _ in range(steps):
            state, metrics = step(state, mesh_lib.global_batch(batch, batch_sharding))
            out.append(jax.device_get(metrics))
        runs.append((state, out))
    return runs


def _step_results(config, mesh, rules, batch, steps=2):
    return _step_runs(config, mesh, rules, [batch], steps)[0]


def test_gradient_accumulation_matches_the_full_batch(corpus, mesh_2x2x2):
    _, mesh, rules = mesh_2x2x2
    rows = np.random.default_rng(0).integers(0, 256, (8, 33), dtype=np.int32)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    config = tiny_config(corpus, mesh=(2, 2, 2, 1, 1))
    _, full = _step_results(config, mesh, rules, batch)
    config.train.grad_accum_steps = 2  # micro-batches of 4 rows, one per batch shard
    _, accumulated = _step_results(config, mesh, rules, batch)
    for a, b in zip(full, accumulated):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters(corpus):
    config = tiny_config(corpus, mesh=(1, 1, 1, 1, 1))
    mesh, rules = mesh_lib.make_mesh(config.mesh, jax.devices()[:1]), mesh_lib.axis_rules(config.mesh)
    rows = np.random.default_rng(0).integers(0, 256, (8, 33), dtype=np.int32)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    _, f32 = _step_results(config, mesh, rules, batch, steps=1)
    config.model.dtype = "bfloat16"
    state, bf16 = _step_results(config, mesh, rules, batch, steps=1)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(bf16[0]["loss"], f32[0]["loss"], rtol=2e-2)  # bf16 has 8 mantissa bits
    assert bf16[0]["loss"] != f32[0]["loss"]


def test_resumed_metrics_drop_the_dead_runs_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')  # killed mid-line
    logger = MetricsLogger(str(tmp_path), total_steps=10, start_step=3)
    logger.train(4, loss=0.2, grad_norm=1.0, learning_rate=0.1, tokens_per_sec=None, eta_sec=float("nan"),
                 elapsed_sec=1.0)
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(path))] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("warmup_steps", 6, r"train.warmup_steps: 6 must be smaller than train.steps \(6\)"),
        ("keep_checkpoints", 0, r"train.keep_checkpoints: must be an int >= 1, got 0"),
        ("b2", 1.0, r"train.b2: must be a number in \[0, 1\), got 1.0"),
        ("learning_rate", 0.0, r"train.learning_rate: must be a number > 0"),
    ],
)
def test_train_config_errors_name_the_key(corpus, key, value, message):
    """The trainer's config errors are `validate`'s (every case: tests/test_config.py)."""
    config = tiny_config(corpus)
    setattr(config.train, key, value)
    with pytest.raises(ValueError, match=message):
        validate(config)
    with pytest.raises(ConfigError, match=message):
        train(config, "/nonexistent/never/created")


def test_metrics_buffer_averages_the_window_and_stops_at_a_non_finite_loss():
    buffer = MetricsBuffer()
    buffer.add(1, {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(5.0)})  # no "learning_rate"
    buffer.add(2, {"loss": jnp.float32(4.0), "grad_norm": jnp.float32(3.0)})
    assert buffer.fetch() is None
    assert buffer.take() == {"loss": 3.0, "grad_norm": 3.0}
    buffer.add(3, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "learning_rate": jnp.float32(0.5)})
    buffer.add(4, {"loss": jnp.float32(np.nan), "grad_norm": jnp.float32(1.0)})
    buffer.add(5, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)})
    step, loss = buffer.fetch()
    assert step == 4 and math.isnan(loss)
    assert buffer.take() == {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 0.5}  # steps after 4 dropped
