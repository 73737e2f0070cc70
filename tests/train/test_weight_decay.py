"""Weight decay by role: every parameter of every experiment config (and every registered mixer)
decays exactly when its name says it should, and one AdamW update shows it. Models are built
abstractly (`nnx.eval_shape`): roles are static metadata, so nothing needs computing."""
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.models import build_model
from hybrid_jax.nn import MIXERS, build_mixer, mixer_config, param_roles
from hybrid_jax.train.optim import make_optimizer, weight_decay_mask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.splitext(os.path.basename(path))[0]
                 for path in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))
                 if not path.endswith("__init__.py"))
# a_param: RG-LRU Lambda; window_factor: LoLCATs' window/linear mixing logit
NO_DECAY_NAMES = {"A_log", "dt_bias", "D", "bias", "level_weight", "a_param", "window_factor"}


def _expected_decay(path: tuple, decay_embeddings: bool) -> bool:
    """What the parameter's name says: SSM gate parameters, biases, norm scales and level weights
    never decay; projection / conv / feature-map kernels do; the embedding per decay_embeddings."""
    name, owner = str(path[-1]), str(path[-2]) if len(path) > 1 else ""
    if name in NO_DECAY_NAMES or (name == "scale" and "norm" in owner):
        return False
    if name == "embedding":
        return decay_embeddings
    assert name in ("kernel", "weight"), f"parameter {'/'.join(map(str, path))} has a name this test does not know"
    return True


def _flat(tree) -> dict:
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_mask_follows_names(roles, decay_embeddings: bool) -> dict:
    mask = _flat(weight_decay_mask(roles, decay_embeddings=decay_embeddings))
    wrong = {path: decays for path, decays in mask.items() if decays != _expected_decay(path, decay_embeddings)}
    assert not wrong, f"parameters whose decay contradicts their name: {wrong}"
    return mask


def _model(name: str, **model_overrides):
    """The config and its model, built abstractly (shapes, axes and roles; nothing computed)."""
    config = load_config(os.path.join(ROOT, "experiments", "configs", f"{name}.py") + ":tiny")
    for key, value in model_overrides.items():
        setattr(config.model, key, value)
    return config, nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))


def _train_config(base, weight_decay: float):
    train = ml_collections.ConfigDict(base.to_dict())
    train.weight_decay, train.learning_rate, train.warmup_steps, train.steps = weight_decay, 0.1, 1, 10
    return train


def _updates_without_and_with_decay(train_config, roles, params):
    """Params after one AdamW update with zero gradients (so only weight decay can move them), with
    weight decay 0 and 0.5, from the same params. One jit: a compile, not hundreds of eager ops."""

    def one_update(weight_decay):
        optimizer, _ = make_optimizer(_train_config(train_config, weight_decay), roles)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(zeros, optimizer.init(params), params)
        return jax.tree.map(lambda p, u: p + u, params, updates)

    return jax.jit(lambda: (one_update(0.0), one_update(0.5)))()


@pytest.mark.parametrize("name", CONFIGS)
def test_experiment_configs_decay_by_role(name):
    config, model = _model(name)
    roles = param_roles(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.structure(roles) == jax.tree.structure(params)
    for decay_embeddings in (True, False):
        _assert_mask_follows_names(roles, decay_embeddings)
    mask = _assert_mask_follows_names(roles, bool(config.train.decay_embeddings))
    assert any(mask.values()) and not all(mask.values())
    # Behaviour. Every parameter starts at one (a zero-initialised bias would not move under decay
    # either, and could hide a wrong mask); weight decay 0 vs 0.5, zero gradients.
    params = jax.tree.map(lambda shape: jnp.ones(shape.shape, shape.dtype), params)
    still, decayed = map(_flat, _updates_without_and_with_decay(config.train, roles, params))
    for path, before in _flat(params).items():
        np.testing.assert_array_equal(still[path], before, err_msg=f"{path} moved without decay")
        moved = not np.array_equal(decayed[path], before)
        assert moved == mask[path], f"{path}: decays per mask {mask[path]}, moved with weight decay 0.5: {moved}"


def test_untied_output_head_decays_as_a_weight():
    _, model = _model("transformer", tie_embeddings=False)
    roles = param_roles(model)
    assert roles["lm_head"]["kernel"] == "weight" and roles["embed"]["embedding"] == "embedding"
    mask = _assert_mask_follows_names(roles, decay_embeddings=False)
    assert mask[("lm_head", "kernel")] and not mask[("embed", "embedding")]


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_every_mixer_kind_declares_roles(kind):
    """Kinds no experiment config uses (GLA, Hedgehog linear attention, Mamba, ...) too; abstract."""
    overrides = {"feature_map": "hedgehog"} if kind == "linear_attention" else {}  # its A_h, b_h
    layer = nnx.eval_shape(lambda: build_mixer(mixer_config(kind, **overrides), 64, rngs=nnx.Rngs(0)))
    _assert_mask_follows_names(param_roles(layer), decay_embeddings=True)
