"""LoLCATs stages at tiny size: stage 1 trains only the feature maps and mixing factors and lowers
every layer's transfer error; stage 2 trains only the LoRA adapters, lowers the next-token loss, and
its merged model equals the unmerged one; hybrids take each layer's weights from the right model."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.inference.checkpoint import load_model
from hybrid_jax.lolcats import selection
from hybrid_jax.lolcats.evaluate import heldout_nll
from hybrid_jax.lolcats.finetune import run_finetune
from hybrid_jax.lolcats.swap import graft_params, layer_kinds, layered_config, with_lora
from hybrid_jax.lolcats.text import load_text, tokenize_splits
from hybrid_jax.lolcats.transfer import run_transfer
from hybrid_jax.models.layer_params import model_params, model_with_params
from hybrid_jax.nn.lora import merge_lora_params
from tests.inference.helpers import B, TOTAL, check_decoding

FEATURE_MAP_KEYS = ("feature_map_q", "feature_map_k", "window_factor")


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _logits(model_cfg, params, tokens):
    model = model_with_params(model_cfg, params)
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens)))


def test_stage1_trains_only_feature_maps_and_lowers_transfer_error(stage1):
    swapped = _flat(graft_params(stage1.teacher_params, stage1.teacher_cfg, stage1.model_cfg))
    trained = _flat(stage1.params)
    assert swapped.keys() == trained.keys()
    changed = {name for name in trained if not np.array_equal(trained[name], swapped[name])}
    assert changed and all(any(key in name for key in FEATURE_MAP_KEYS) for name in changed), changed
    for key in FEATURE_MAP_KEYS:  # each kind of stage-1 parameter moved
        assert any(key in name for name in changed), key
    teacher = _flat(stage1.teacher_params)  # the projections are the pretrained ones, bit for bit
    assert np.array_equal(teacher["['periods']['blocks'][0]['mixer']['q_proj']['kernel']"],
                          trained["['periods']['blocks'][0]['mixer']['q_proj']['kernel']"])
    assert all(after < before for after, before in zip(stage1.errors, stage1.errors_before)), (
        stage1.errors, stage1.errors_before)


def test_stage1_run_folder_loads_and_resumes(tiny_setup, stage1):
    """The run folder loads with hybrid_jax.inference.load_model; a run that lost its last layer's
    checkpoint resumes from the one before (parameters, batch iterator, metrics) and ends bit-identical."""
    config, folder = tiny_setup
    model, run_config, step = load_model(os.path.join(config.workdir, "transfer"))
    assert step == config.transfer.steps * 2 and layer_kinds(run_config.model) == ["lolcats"] * 2
    expected = _flat(stage1.params)
    for name, value in _flat(model_params(model)).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    config = config.copy_and_resolve_references()
    config.workdir = str(folder / "resumed")
    shutil.copytree(os.path.join(tiny_setup[0].workdir, "transfer"), os.path.join(config.workdir, "transfer"))
    shutil.rmtree(os.path.join(config.workdir, "transfer", "checkpoints", str(step)))  # as if killed in layer 2
    again = run_transfer(config)
    assert again.errors == stage1.errors and again.errors_before == stage1.errors_before
    for name, value in _flat(again.params).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_stage2_trains_only_lora_lowers_loss_and_merges(tiny_setup, stage1):
    config, _ = tiny_setup
    splits = tokenize_splits(load_text(config.text.source), stage1.tokenizer, config.text.held_out_fraction)
    windows = splits.windows("train", config.finetune.seq_len + 1, 4)
    before = heldout_nll(stage1.model_cfg, stage1.params, windows)
    result = run_finetune(config, stage1)
    start = _flat(stage1.params)
    for name, value in _flat(result.params).items():
        if "lora_" not in name:  # every pretrained weight and stage-1 feature map: bit-unchanged
            np.testing.assert_array_equal(value, start[name], err_msg=name)
    after = heldout_nll(result.model_cfg, result.params, windows)
    assert after < before - 0.1, (before, after)
    merged = merge_lora_params(result.params, config.finetune.lora_alpha)
    assert not any("lora_" in name for name in _flat(merged))
    np.testing.assert_allclose(_logits(stage1.model_cfg, merged, windows[:2]),
                               _logits(result.model_cfg, result.params, windows[:2]), rtol=1e-4, atol=1e-4)


def test_lora_starts_as_the_identity_update(stage1):
    lora_cfg = with_lora(stage1.model_cfg, {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": "qv"})
    params = graft_params(stage1.params, stage1.model_cfg, lora_cfg, seed=3)
    names = [name for name in _flat(params) if "lora_" in name]
    assert names and all("q_proj" in name or "v_proj" in name for name in names)
    tokens = np.arange(40).reshape(2, 20) % 250
    np.testing.assert_array_equal(_logits(lora_cfg, params, tokens), _logits(stage1.model_cfg, stage1.params, tokens))


def test_selection_rules():
    errors = [0.1, 0.5, 0.05, 0.4, 0.3, 0.01]
    assert selection.ranked_layers(errors, 2) == [1, 3]
    assert selection.evenly_spaced_layers(30, 4) == [3, 11, 18, 26]
    assert selection.evenly_spaced_layers(6, 2) == [1, 4]
    with pytest.raises(ValueError, match=r"num_softmax: 7 must be in \[0, 6\]"):
        selection.ranked_layers(errors, 7)
    relative = [0.5, 0.1, 0.9, 0.2, 0.3, 0.8]
    assert selection.softmax_layers("relative", 2, raw=errors, relative=relative) == [2, 5]
    assert selection.softmax_layers("raw", 2, raw=errors, relative=relative) == [1, 3]
    assert selection.softmax_layers("even", 2, raw=errors, relative=relative) == [1, 4]
    with pytest.raises(ValueError, match=r"rule: 'random' is not valid; valid rules are \['relative', 'raw', 'even'\]"):
        selection.softmax_layers("random", 1, raw=errors, relative=relative)


def test_hybrid_takes_softmax_layers_from_the_teacher(tiny_setup, stage1):
    config, _ = tiny_setup
    tokens = np.arange(60).reshape(2, 30) % 250
    teacher_logits = _logits(stage1.teacher_cfg, stage1.teacher_params, tokens)
    cfg, params = selection.hybrid(stage1.teacher_params, stage1.teacher_cfg, stage1.params, stage1.model_cfg,
                                   [0, 1], config.lolcats)
    assert cfg.pattern == "A"  # every layer kept: the original model again
    np.testing.assert_array_equal(_logits(cfg, params, tokens), teacher_logits)
    cfg, params = selection.hybrid(stage1.teacher_params, stage1.teacher_cfg, stage1.params, stage1.model_cfg,
                                   [1], config.lolcats)
    assert cfg.pattern == "LA" and layer_kinds(cfg) == ["lolcats", "attention"]
    layer_cfg = layered_config(stage1.teacher_cfg, ["lolcats", "attention"], config.lolcats)
    assert cfg.to_dict() == layer_cfg.to_dict()
    hybrid_params = _flat(params)
    assert np.array_equal(hybrid_params["['periods']['blocks'][0]['mixer']['window_factor']"][0],
                          _flat(stage1.params)["['periods']['blocks'][0]['mixer']['window_factor']"][0])
    assert np.array_equal(hybrid_params["['periods']['blocks'][1]['mixer']['q_proj']['kernel']"][0],
                          _flat(stage1.teacher_params)["['periods']['blocks'][0]['mixer']['q_proj']['kernel']"][1])


def test_hybrid_model_decodes_like_its_forward(tiny_setup, stage1):
    """Prefill + token-by-token decoding of a LoLCATs + softmax hybrid equals its forward (window 3 of
    11 tokens: the recurrent state takes every token that leaves the window)."""
    config, _ = tiny_setup
    section = dict(config.lolcats.items(), window=3, chunk_size=4)
    cfg, params = selection.hybrid(stage1.teacher_params, stage1.teacher_cfg, stage1.params, stage1.model_cfg,
                                   [1], section)
    tokens = jnp.asarray(np.arange(B * TOTAL).reshape(B, TOTAL) * 7 % 250)
    check_decoding(model_with_params(cfg, params), tokens)


def test_selection_command_writes_a_loadable_hybrid(tiny_setup, stage1):
    config, _ = tiny_setup
    config = config.copy_and_resolve_references()
    config.selection.num_softmax = 1
    run_dir = selection.write_hybrid(config)
    model, run_config, _ = load_model(run_dir)
    worst = int(np.argmax(stage1.relative_errors))
    expected = ["attention" if layer == worst else "lolcats" for layer in range(2)]
    assert layer_kinds(run_config.model) == expected
