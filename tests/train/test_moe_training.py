"""MoE training on 8 fake CPU devices: expert-parallel meshes equal one device, the balancing-bias
update inside the step, per-layer metrics, and a stopped run resuming with identical losses."""
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from hybrid_jax.train import mesh as mesh_lib
from hybrid_jax.train import read_metrics, train
from hybrid_jax.train.state import build_train_setup
from hybrid_jax.train.step import make_train_step
from tests.train.helpers import tiny_config

RATE = 1e-2  # the balancing-bias step
# Different meshes change only the order of float32 partial sums (see tests/train/test_loop.py).
MESH_RTOL = 1e-5


def moe_config(corpus, mesh=(1, 1, 1, 1, 1), **train_overrides):
    """The tiny transformer (2 layers) with layer 1 MoE: one lead period and one scanned period."""
    config = tiny_config(corpus, mesh=mesh, **train_overrides)
    config.model.ffn = "moe"
    config.model.moe.update(dict(num_experts=8, experts_per_token=2, num_shared_experts=1, mlp_dim=32,
                                 router="sigmoid", bias_update_rate=RATE, aux_loss_weight=0.01,
                                 z_loss_weight=1e-3))
    config.model.moe_layers.first_dense_layers = 1
    return config


def run_steps(config, devices, batches):
    mesh, rules = mesh_lib.make_mesh(config.mesh, devices), mesh_lib.axis_rules(config.mesh)
    setup = build_train_setup(config, mesh, rules)
    sharding = NamedSharding(mesh, mesh_lib.batch_spec(rules))
    step = make_train_step(setup.graphdef, setup.optimizer, state_shardings=setup.state_shardings,
                           batch_sharding=sharding)
    state, metrics = setup.init_state(0), []
    for batch in batches:
        state, out = step(state, mesh_lib.global_batch(batch, sharding))
        metrics.append(jax.device_get(out))
    return jax.device_get(state), metrics, setup


@pytest.fixture(scope="module")
def batches():
    rows = np.random.default_rng(0).integers(0, 256, (2, 8, 33), dtype=np.int32)
    return [{"inputs": r[:, :-1], "targets": r[:, 1:]} for r in rows]


@pytest.fixture(scope="module")
def one_device(corpus, batches):
    return run_steps(moe_config(corpus), jax.devices()[:1], batches)


def test_step_updates_the_balancing_biases_from_the_load(one_device):
    state, metrics, setup = one_device
    bias = state.buffers["periods"]["blocks"][0]["ffn"]["balance_bias"]  # layer 1, stacked [1, E]
    assert bias.shape == (1, 8)
    # Two updates of +-RATE (or 0 where an expert sat exactly at the mean load).
    assert set(np.round(np.abs(bias) / RATE).astype(int).ravel()) <= {0, 1, 2} and np.abs(bias).max() > 0
    assert "balance_bias" not in str(jax.tree_util.tree_structure(state.params))
    for record in metrics:
        assert record["moe/layer1/max_mean_load"] >= 1.0 and record["moe/layer1/dropped"] == 0.0
        penalty = 0.01 * record["moe/layer1/aux_loss"] + 1e-3 * record["moe/layer1/z_loss"]
        np.testing.assert_allclose(record["moe/penalty"], penalty, rtol=1e-5)
        assert not any(key.startswith("moe/layer0") for key in record)  # layer 0 is dense
    spec = setup.abstract_state.params["periods"]["blocks"][0]["ffn"]["gate"]["kernel"].sharding.spec
    assert tuple(spec)[:2] == (None, None)  # a one-device mesh shards nothing


@pytest.mark.parametrize("mesh", [(2, 1, 2, 2, 1), (2, 1, 1, 4, 1), (1, 1, 1, 8, 1)],
                         ids=["data2-tensor2-expert2", "data2-expert4", "expert8"])
def test_expert_parallel_mesh_equals_one_device(corpus, batches, one_device, mesh):
    reference, reference_metrics, _ = one_device
    state, metrics, setup = run_steps(moe_config(corpus, mesh=mesh), jax.devices(), batches)
    gate = setup.abstract_state.params["periods"]["blocks"][0]["ffn"]["gate"]["kernel"]
    assert tuple(gate.sharding.spec)[1] == "expert"  # [layers, expert, embed, mlp]
    for got, want in zip(metrics, reference_metrics):
        for key in ("loss", "grad_norm", "moe/layer1/max_mean_load", "moe/penalty"):
            np.testing.assert_allclose(got[key], want[key], rtol=MESH_RTOL, err_msg=key)
    # The routing (and so the bias update) is the same: the loads are counts, not sums of floats.
    # (Parameters are compared through the second step's loss: Adam's g / sqrt(v) magnifies the
    # partial-sum order of near-zero gradients in single elements.)
    np.testing.assert_array_equal(jax.tree.leaves(state.buffers), jax.tree.leaves(reference.buffers))


def _records(workdir):
    return {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def test_stopped_run_resumes_with_identical_losses_and_biases(corpus, tmp_path):
    config = moe_config(corpus, mesh=(-1, 1, 1, 1, 1), steps=4, checkpoint_every=2)
    config.model.moe.dispatch = "capacity"  # also checks the dropped-fraction metric
    config.model.moe.capacity_factor = 1.0
    straight = str(tmp_path / "straight")
    train(config, straight)
    resumed = str(tmp_path / "resumed")
    assert train(config, resumed, stop_at_step=2).status == "stopped"
    assert train(config, resumed).status == "completed"
    want, got = _records(straight), _records(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        moe_keys = [key for key in want[step] if key.startswith("moe/")]
        assert "moe/layer1/dropped" in moe_keys and "moe/layer1/max_mean_load" in moe_keys
        for key in ["loss", *moe_keys]:
            assert got[step][key] == want[step][key], (step, key)
    assert any(want[step]["moe/layer1/dropped"] > 0 for step in want)  # capacity 1.0 drops some
    assert os.listdir(os.path.join(resumed, "tensorboard"))
    from hybrid_jax.inference import load_model
    from hybrid_jax.nn.moe import ExpertBias
    from flax import nnx
    biases = [nnx.to_pure_dict(nnx.state(load_model(w)[0], ExpertBias)) for w in (straight, resumed)]
    np.testing.assert_array_equal(*(jax.tree.leaves(b)[0] for b in biases))
    assert np.abs(jax.tree.leaves(biases[0])[0]).max() > 0  # the checkpoint carries trained biases
