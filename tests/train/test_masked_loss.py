"""The masked loss ("loss_mask"): its value, its gradients under accumulation, and a synthetic-task run
(val_accuracy in the eval records, exact resume, the accuracy plot)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.train import read_metrics, train
from hybrid_jax.train import mesh as mesh_lib
from hybrid_jax.train.step import loss_weight, masked_token_sums
from tests.train.helpers import tiny_config
from tests.train.test_parts import _step_results, _step_runs


def test_masked_sums_match_numpy_and_an_all_ones_mask_is_no_mask():
    keys = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(keys[0], (3, 5, 7))
    targets = jax.random.randint(keys[1], (3, 5), 0, 7)
    mask = (jax.random.uniform(keys[2], (3, 5)) < 0.5).astype(jnp.float32)
    sums = masked_token_sums(logits, {"targets": targets, "loss_mask": mask})
    nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    correct = np.asarray(jnp.argmax(logits, -1) == targets)
    m = np.asarray(mask)
    np.testing.assert_allclose(sums["nll"], (m * nll).sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["correct"], (m * correct).sum())
    assert sums["weight"] == m.sum()
    plain = masked_token_sums(logits, {"targets": targets})
    ones = masked_token_sums(logits, {"targets": targets, "loss_mask": jnp.ones((3, 5))})
    for key in plain:
        np.testing.assert_allclose(plain[key], ones[key], rtol=1e-6)
    assert loss_weight({"targets": targets}) == 15
    assert loss_weight({"targets": targets, "loss_mask": jnp.zeros((3, 5))}) == 1  # never divides by 0


def test_masked_gradient_accumulation_matches_the_full_batch_and_ignores_unmasked_targets(corpus):
    config = tiny_config(corpus, mesh=(2, 2, 2, 1, 1))
    mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.axis_rules(config.mesh)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (8, 33), dtype=np.int32)
    # Uneven masks: the micro-batches hold different numbers of scored tokens.
    mask = (rng.random((8, 32)) < np.linspace(0.1, 0.9, 8)[:, None]).astype(np.float32)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": mask}
    scrambled = dict(batch, targets=np.where(mask > 0, batch["targets"], rng.integers(0, 256, (8, 32))).astype(np.int32))
    (_, full), (_, same) = _step_runs(config, mesh, rules, [batch, scrambled])
    config.train.grad_accum_steps = 2
    _, accumulated = _step_results(config, mesh, rules, batch)
    for a, b, c in zip(full, accumulated, same):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(a["loss"], c["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], c["grad_norm"], rtol=1e-6)


def mqar_config(corpus, **train_settings):
    config = tiny_config(corpus, **train_settings)
    config.data.source, config.data.val_rows = "mqar", 16
    config.data.mqar.num_kv_pairs = 4
    return config


def test_mqar_run_reports_accuracy_and_resumes_exactly(corpus, tmp_path):
    settings = dict(eval_every=3)
    reference = train(mqar_config(corpus, **settings), str(tmp_path / "reference"))
    workdir = str(tmp_path / "run")
    assert train(mqar_config(corpus, **settings), workdir, stop_at_step=4).status == "stopped"
    resumed = train(mqar_config(corpus, **settings), workdir)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["final"]
    assert all(0 <= r["val_accuracy"] <= 1 and "val_bits_per_byte" not in r for r in evals)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    expected = {r["step"]: r["loss"] for r in read_metrics(os.path.join(reference.workdir, "metrics.jsonl"))
                if "loss" in r}
    assert sorted(losses) == sorted(expected) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-6)
    np.testing.assert_allclose(resumed.final_eval["val_accuracy"], reference.final_eval["val_accuracy"])
    assert resumed.chance_accuracy == 1 / 128 and resumed.unigram_bits_per_byte is None
    assert "validation: accuracy" in resumed.summary() and os.path.exists(resumed.plot_path)
