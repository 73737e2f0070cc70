"""Config schema: each broken config fails with one clear message; every experiment config validates."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from hybrid_jax.config import get_default_config, layer_pattern, load_config, mixer, preset_config, validate
from hybrid_jax.inspect import inspect_model
from hybrid_jax.models import build_model
from hybrid_jax.nn import MIXERS, count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "experiments" / "configs").glob("[!_]*.py"))


def test_default_config_validates_and_is_locked():
    config = validate(get_default_config())
    assert config.model.mixers.A.kind == "attention" and config.mesh.axes == ("data", "fsdp", "tensor", "expert", "context")
    with pytest.raises(
        AttributeError, match='Key "num_layer" does not exist and cannot be added since the config is locked'
    ):
        config.model.num_layer = 4
    with pytest.raises(AttributeError, match='Key "num_head" does not exist'):
        config.model.mixers.A.num_head = 4


def _broken(edit):
    config = get_default_config()
    config.unlock()
    edit(config)
    return config


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: setattr(c.train, "lr", 1.0),
            r"train.lr: unknown config key; valid keys in train are \[.*'learning_rate'",
        ),
        (
            lambda c: setattr(c, "optimizer", {}),
            r"optimizer: unknown config key; valid keys are \['data', 'mesh', 'model', 'train'\]",
        ),
        (
            lambda c: setattr(c.model, "mixers", {"A": {"kind": "transformer"}}),
            r"model.mixers.A \(kind 'transformer'\): unknown mixer kind 'transformer'; registered kinds are \[.*'attention'.*'mla'",
        ),
        (
            lambda c: delattr(c.model, "norm_eps"),
            r"model.norm_eps: missing; build configs from hybrid_jax.config.get_default_config",
        ),
        (
            lambda c: setattr(c.model, "mixers", {"AB": mixer("attention")}),
            r"model.mixers: key 'AB' must be a single pattern letter",
        ),
        (
            lambda c: setattr(c.model, "pattern", "AK"),
            r"model.pattern: letter 'K' has no mixer in model.mixers; defined letters are \['A'\]",
        ),
        (
            lambda c: setattr(c.model, "mixers", {"A": mixer("attention", num_heads=6)}),
            r"model.mixers.A \(kind 'attention'\): num_heads: 6 does not divide d_model=512",
        ),
        (
            lambda c: (
                setattr(c.model, "pattern", "AAM"),
                setattr(c.model, "mixers", {"A": mixer("attention"), "M": mixer("mla")}),
            ),
            r"model.num_layers: 8 is not a multiple of the pattern period 3 \(model.pattern='AAM'\); valid values are multiples of 3",
        ),
        (
            lambda c: setattr(c.model, "mixers", {"A": {"kind": "attention", "num_head": 4}}),
            r"model.mixers.A \(kind 'attention'\): unknown key\(s\) \['num_head'\] for mixer kind 'attention'; valid keys are \['head_dim', 'impl'",
        ),
        (
            lambda c: setattr(c.model, "ffn", "mixture"),
            r"model.ffn: 'mixture' is not valid; valid values are \['swiglu', 'moe', 'none'\]",
        ),
        (
            lambda c: setattr(c.model, "remat", "dots"),
            r"model.remat: 'dots' is not valid; valid values are \['none', 'full', 'save_dots'\]",
        ),
        (
            lambda c: setattr(c.model, "dtype", "float16"),
            r"model.dtype: 'float16' is not valid; valid values are \['float32', 'bfloat16'\]",
        ),
        (lambda c: setattr(c.model, "d_model", 0), r"model.d_model: must be an int >= 1, got 0"),
        (
            lambda c: setattr(c.model, "pattern", ""),
            r"model.pattern: must be a non-empty string of mixer letters",
        ),
        (lambda c: setattr(c.train, "batch_size", 0), r"train.batch_size: must be an int >= 1, got 0"),
        (
            lambda c: setattr(c.data, "tokenizer", "sentencepiece"),
            r"data.tokenizer: 'sentencepiece' is not valid; valid values are \['byte', 'gpt2'\] or a SentencePiece",
        ),
        (
            lambda c: setattr(c.mesh, "shape", (2, 4)),
            r"mesh.shape: \(2, 4\) must have one size per mesh axis in mesh.axes=\('data', 'fsdp', 'tensor', 'expert', 'context'\)",
        ),
        (
            lambda c: setattr(c.mesh, "shape", (-1, -1, 1, 1, 1)),
            r"mesh.shape: sizes must be ints >= 1 with at most one -1",
        ),
        (
            lambda c: setattr(c.mesh, "axis_rules", (("embed", "model"),)),
            r"mesh.axis_rules: rule \('embed', 'model'\) names mesh axis 'model'; valid mesh axes are \('data', 'fsdp', 'tensor', 'expert', 'context'\)",
        ),
    ],
)
def test_validation_errors(edit, message):
    with pytest.raises(ValueError, match=message):
        validate(_broken(edit))


def _train(key, value):
    return lambda c: setattr(c.train, key, value)


# Every check the trainer relies on: a config that passes `validate` with the run's device and
# process counts fails in `train()` only for what a config cannot know (data path, tokenizer size).
@pytest.mark.parametrize(
    "edit, counts, message",
    [
        (_train("grad_accum_steps", 0), {}, r"train.grad_accum_steps: must be an int >= 1, got 0"),
        (_train("grad_accum_steps", True), {}, r"train.grad_accum_steps: must be an int >= 1, got True"),
        (_train("keep_checkpoints", 0), {}, r"train.keep_checkpoints: must be an int >= 1, got 0"),
        (_train("grad_accum_steps", 3), {}, r"train.grad_accum_steps: 3 must divide train.batch_size \(16\)"),
        (_train("warmup_steps", 1000), {}, r"train.warmup_steps: 1000 must be smaller than train.steps \(1000\)"),
        (_train("min_learning_rate_ratio", 1.5), {}, r"train.min_learning_rate_ratio: must be a number in \[0, 1\]"),
        (_train("b1", -0.1), {}, r"train.b1: must be a number in \[0, 1\), got -0.1"),
        (_train("b2", 1.0), {}, r"train.b2: must be a number in \[0, 1\), got 1.0"),
        (_train("weight_decay", -1e-4), {}, r"train.weight_decay: must be a number >= 0"),
        (_train("grad_clip", -1.0), {}, r"train.grad_clip: must be a number >= 0"),
        (_train("adam_eps", 0.0), {}, r"train.adam_eps: must be a number > 0, got 0.0"),
        (_train("learning_rate", 0.0), {}, r"train.learning_rate: must be a number > 0, got 0.0"),
        (_train("seed", -1), {}, r"train.seed: must be an int >= 0, got -1"),
        (lambda c: setattr(c.data, "worker_count", 2), {}, r"data.worker_count: .*only 0 is supported, got 2"),
        (lambda c: setattr(c.data, "val_fraction", 1.0), {}, r"data.val_fraction: must be a number in \(0, 1\)"),
        (
            lambda c: setattr(c.mesh, "axis_rules", (("embed", "fsdp"), ("embed", None))),
            {},
            r"mesh.axis_rules: logical axis 'embed' has more than one rule",
        ),
        (
            lambda c: setattr(c.mesh, "shape", (3, 1, 1, 1, 1)),
            {"device_count": 8},
            r"mesh.shape: \(3, 1, 1, 1, 1\) needs 3 devices but 8 are available",
        ),
        (
            lambda c: setattr(c.mesh, "shape", (3, -1, 1, 1, 1)),
            {"device_count": 8},
            r"mesh.shape: \(3, -1, 1, 1, 1\): the fixed axes \(3 devices\) do not divide the 8",
        ),
        (
            _train("batch_size", 4),
            {"device_count": 8},
            r"train.batch_size: 4 / grad_accum_steps 1 = 4 rows per micro-batch must divide over the 8 batch shards",
        ),
        (  # known without a device count: no batch axis is -1
            lambda c: (setattr(c.mesh, "shape", (2, -1, 4, 1, 1)), setattr(c.mesh, "axis_rules", (("batch", "data"),)),
                       setattr(c.train, "batch_size", 3), setattr(c.train, "grad_accum_steps", 3)),
            {},
            r"train.batch_size: 3 / grad_accum_steps 3 = 1 rows per micro-batch must divide over the 2 batch",
        ),
        (_train("batch_size", 6), {"process_count": 4}, r"train.batch_size: 6 must divide over 4 processes"),
    ],
)
def test_trainer_checks_are_in_validate(edit, counts, message):
    with pytest.raises(ValueError, match=message):
        validate(_broken(edit), **counts)


def test_device_count_resolves_the_mesh_for_the_batch_check():
    config = get_default_config()
    config.train.batch_size = 4
    validate(config)  # (-1, 1, 1, 1, 1): the batch shards are unknown without the device count
    validate(config, device_count=4)
    with pytest.raises(ValueError, match=r"train.batch_size: .* over the 8 batch shards"):
        validate(config, device_count=8)


def test_mixer_helper():
    cfg = mixer("mla", num_heads=4, qk_rope_head_dim=0)
    assert cfg.kind == "mla" and cfg.num_heads == 4 and cfg.qk_rope_head_dim == 0 and cfg.kv_lora_rank == 128
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['rope'\] for mixer kind 'mla'; valid keys are \["
    ):
        mixer("mla", rope=False)
    with pytest.raises(ValueError, match=r"unknown mixer kind 'gqa'; registered kinds are \["):
        mixer("gqa")
    with pytest.raises(ValueError, match=r"mixer kind 'attention': num_heads='4' has the wrong type"):
        mixer("attention", num_heads="4")


def test_layer_pattern_and_presets():
    config = preset_config("tiny")
    config.model.pattern, config.model.num_layers = "KKKM", 8
    assert "".join(layer_pattern(config.model)) == "KKKMKKKM"
    with pytest.raises(
        ValueError, match=r"unknown preset 'huge'; valid presets are \['tiny', 'small', 'base'\]"
    ):
        preset_config("huge")


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="config file 'missing.py' not found"):
        load_config("missing.py:tiny")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config(str(empty))


# Approximate sizes the presets promise (the vocabulary embedding is a large share at these widths).
PARAM_RANGES = {"small": (18e6, 32e6), "base": (100e6, 150e6)}


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_experiment_config(path, preset):
    config = load_config(f"{path}:{preset}")
    kinds = {cfg.kind for cfg in config.model.mixers.values()}  # the config's mixer kinds
    assert kinds <= set(MIXERS) and set(config.model.mixers.keys()) == set(config.model.pattern)
    abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    if preset == "tiny":
        # Trace (not compile) the forward pass: shapes and dtypes end to end, at no XLA cost; the
        # layers' numerics are tested in tests/nn and the model's in tests/models.
        graphdef, state = nnx.split(abstract)
        tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
        logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
        assert logits.shape == (2, 32, config.model.vocab_size) and logits.dtype == jnp.float32
    else:
        # The presets size what a token runs: an MoE config's active parameters (top-k experts).
        low, high = PARAM_RANGES[preset]
        active = inspect_model(config, 1).active_params
        assert low <= active <= high and (active == count_params(abstract)) == (config.model.ffn != "moe")
