"""The training loop in-process on 8 fake CPU devices: sharding invariance, resume, errors."""
import math
import os

import jax
import numpy as np
import pytest

from hybrid_jax.train import ConfigError, NonFiniteLossError, read_metrics, train
from tests.train.helpers import tiny_config

# The same run on different meshes differs only by the order of float32 reductions (partial sums
# per device): measured ~2e-7 relative after 6 steps.
MESH_RTOL = 1e-5


def train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def one_device_run(corpus, tmp_path_factory):
    """6 uninterrupted steps on a single device (mesh 1 x 1 x 1 x 1): the reference."""
    workdir = tmp_path_factory.mktemp("one_device")
    result = train(tiny_config(corpus, mesh=(1, 1, 1, 1, 1)), str(workdir), devices=jax.devices()[:1])
    return result, train_losses(workdir)


@pytest.fixture(scope="module")
def resharded_run(corpus, tmp_path_factory):
    """3 steps on mesh data=2, tensor=2, context=2 (each row's time axis split over 2 devices: context
    parallelism), then resumed from the checkpoint on mesh 8 x 1 x 1 x 1 x 1 (context = 1)."""
    workdir = str(tmp_path_factory.mktemp("resharded"))
    first = train(tiny_config(corpus, mesh=(2, 1, 2, 1, 2)), workdir, stop_at_step=3)
    losses_before = train_losses(workdir)
    second = train(tiny_config(corpus, mesh=(8, 1, 1, 1, 1)), workdir)
    return first, second, losses_before, train_losses(workdir)


def test_single_run_completes_with_full_eval(one_device_run):
    result, losses = one_device_run
    assert result.status == "completed" and result.step == 6
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert result.checkpoint_steps == (3, 6)
    final = result.final_eval
    assert final["final"] and final["val_batches"] == 12  # 3277 val tokens // 33 // 8
    # Byte tokens: bits per byte is the loss in bits.
    assert final["val_bits_per_byte"] == pytest.approx(final["val_loss"] / math.log(2), rel=1e-6)
    assert final["val_perplexity"] == pytest.approx(math.exp(final["val_loss"]), rel=1e-6)
    assert losses[6] < losses[1]
    assert os.path.getsize(result.plot_path) > 0
    assert os.listdir(os.path.join(result.workdir, "tensorboard"))


def test_data_tensor_context_mesh_matches_one_device(one_device_run, resharded_run):
    _, reference = one_device_run
    first, _, losses_before, _ = resharded_run
    assert first.status == "stopped" and first.step == 3 and first.checkpoint_steps == (3,)
    assert first.final_eval is None
    np.testing.assert_allclose([losses_before[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                               rtol=MESH_RTOL)


def test_restore_onto_a_different_mesh_continues_the_run(one_device_run, resharded_run):
    reference_result, reference = one_device_run
    _, second, losses_before, losses_after = resharded_run
    assert second.status == "completed" and second.checkpoint_steps == (3, 6)
    # The resumed run kept the first run's records and appended steps 4-6.
    assert sorted(losses_after) == [1, 2, 3, 4, 5, 6]
    assert all(losses_after[s] == losses_before[s] for s in (1, 2, 3))
    np.testing.assert_allclose([losses_after[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)],
                               rtol=MESH_RTOL)
    np.testing.assert_allclose(second.final_eval["val_loss"], reference_result.final_eval["val_loss"],
                               rtol=MESH_RTOL)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    # A learning rate of 1e30 overflows the parameters within a few updates.
    config = tiny_config(corpus, mesh=(1, 1, 1, 1, 1), learning_rate=1e30, steps=20, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"training loss became (nan|inf) at step (\d+).*"
                       r"Last good checkpoint: step (\d+)") as error:
        train(config, str(tmp_path), devices=jax.devices()[:1])
    bad_step = int(error.value.args[0].split(" at step ")[1].split(";")[0])
    steps = sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    assert steps and steps[-1] == bad_step - 1  # every good step was saved, the bad one was not
    recorded = train_losses(tmp_path)
    assert max(recorded) == bad_step - 1 and all(math.isfinite(v) for v in recorded.values())


_compiles = [0]


def _count_compiles(event, duration, **kwargs):
    """Counts tracing, lowering and compilation (and persistent-cache lookups) of any jitted code."""
    if event.startswith(("/jax/core/compile", "/jax/compilation_cache")):
        _compiles[0] += 1


# Registered once: listeners cannot be removed through the public API of every supported jax.
jax.monitoring.register_event_duration_secs_listener(_count_compiles)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.data, "source", "/no/such/corpus.txt"), r"/no/such/corpus\.txt"),
        (lambda c: setattr(c.model, "pattern", "AZ"), r"model\.pattern: letter 'Z' has no mixer"),
        (lambda c: setattr(c.train, "grad_accum_steps", 3), r"train\.grad_accum_steps: 3 must divide train\.batch_size"),
        (lambda c: setattr(c.mesh, "shape", (3, 1, 1, 1, 1)), r"mesh\.shape: \(3, 1, 1, 1, 1\) needs 3 devices but 8"),
        (lambda c: setattr(c.train, "batch_size", 4), r"train\.batch_size: 4 .* must divide over the 8 batch shards"),
        (lambda c: setattr(c.model, "vocab_size", 100), r"model\.vocab_size: 100 is smaller than the 'byte'"),
    ],
)
def test_bad_config_or_data_path_fails_before_compiling(corpus, tmp_path, change, message):
    config = tiny_config(corpus)
    change(config)
    compiles_before = _compiles[0]
    with pytest.raises(ConfigError, match=message):
        train(config, str(tmp_path / "run"))
    assert _compiles[0] == compiles_before
    assert not os.path.exists(tmp_path / "run")


def test_url_workdir_is_refused_not_written_locally(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a quiet os.path.abspath would create ./gs:/bucket/run here
    with pytest.raises(ConfigError, match=r"train\.workdir: 'gs://bucket/run' is a URL"):
        train(tiny_config(corpus), "gs://bucket/run")
    assert not os.path.exists(tmp_path / "gs:")
