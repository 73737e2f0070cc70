"""The config schema: defaults, validation, layer-pattern parsing and config-file loading.

A config has four sections:

* `model`  the network: width, depth, vocabulary, and the layer pattern. `model.pattern` is a string
           of letters, one per layer of a period; `model.mixers` maps each letter to a mixer config
           (`mixer(kind, **overrides)`); the period repeats to `model.num_layers` layers. Every block
           is pre-norm: x += mixer(norm(x)); x += ffn(norm(x)) (no FFN when `model.ffn = "none"`).
* `train`  optimisation and loop settings; `data` the corpus and tokenizer; `mesh` the device mesh
           (`mesh.shape` over `mesh.axes`, -1 = all remaining devices) and the rules mapping the
           logical parameter axes (`hybrid_jax.nn.common`) onto mesh axes.

`get_default_config()` is locked: assigning a key that does not exist raises at once. `validate`
raises one ValueError per problem, naming the key and its valid values. Experiment files
(`experiments/configs/*.py`) define `get_config(preset)` and are loaded with `load_config("path:preset")`.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from hybrid_jax.nn import MIXERS, mixer_config, resolve_mixer_config

ConfigDict = ml_collections.ConfigDict

COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots")
FFN_KINDS = ("swiglu", "none")
TOKENIZERS = ("byte", "gpt2")  # or the path of a SentencePiece ".model" file
PRESETS = ("tiny", "small", "base")

# Mesh axes of the training loop; logical parameter axes map onto them (None = replicated).
MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("latent", None),
    ("expert", None),
    ("norm", None),
    ("conv", None),
    ("layers", None),
)


def mixer(kind: str, **overrides) -> ConfigDict:
    """The default config of mixer `kind` with `overrides` applied (unknown key -> ValueError)."""
    return mixer_config(kind, **overrides)


def get_default_config() -> ConfigDict:
    config = ConfigDict()
    config.model = ConfigDict(
        {
            "vocab_size": 50304,  # GPT-2 BPE (50257) padded to a multiple of 64
            "d_model": 512,
            "num_layers": 8,
            "pattern": "A",
            "mixers": {"A": mixer("attention")},
            "ffn": "swiglu",
            "mlp_dim": 1536,
            "tie_embeddings": True,
            "norm_eps": 1e-6,
            "dtype": "float32",  # compute dtype; parameters stay float32
            "remat": "none",
        }
    )
    config.train = ConfigDict(
        {
            "steps": 1000,
            "batch_size": 16,  # global, summed over micro-batches and processes
            "grad_accum_steps": 1,  # micro-batches per optimiser step (batch_size must divide)
            "seq_len": 256,
            "learning_rate": 3e-4,
            "min_learning_rate_ratio": 0.1,  # cosine decay floor, as a fraction of the peak
            "warmup_steps": 100,
            "weight_decay": 0.1,  # on weight matrices only (each parameter declares its role)
            "decay_embeddings": True,  # whether the token embedding (and a tied output) decays too
            "b1": 0.9,
            "b2": 0.95,
            "adam_eps": 1e-8,
            "grad_clip": 1.0,
            "seed": 0,
            "log_every": 10,
            "eval_every": 200,
            "eval_steps": 10,
            "checkpoint_every": 500,
            "keep_checkpoints": 3,  # the newest K checkpoints are kept
            "workdir": "runs/default",
        }
    )
    config.data = ConfigDict(
        {
            "source": "shakespeare",  # or a folder of .txt, a .txt, .npy or .array_record file
            "tokenizer": "gpt2",
            "val_fraction": 0.05,  # the last val_fraction of the tokens are held out
            "worker_count": 0,
        }
    )
    config.mesh = ConfigDict({"shape": (-1, 1, 1), "axes": MESH_AXES, "axis_rules": DEFAULT_AXIS_RULES})
    config.lock()
    return config


def layer_pattern(model_cfg) -> list[str]:
    """The mixer letter of every layer: `model.pattern` repeated to `model.num_layers`."""
    period = len(model_cfg.pattern)
    return list(model_cfg.pattern) * (model_cfg.num_layers // period)


def _fail(key: str, message: str):
    raise ValueError(f"{key}: {message}")


def _check_int(section, prefix: str, key: str, minimum: int) -> None:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"{prefix}.{key}", f"must be an int >= {minimum}, got {value!r}")


def _check_choice(section, prefix: str, key: str, choices) -> None:
    if section[key] not in choices:
        _fail(f"{prefix}.{key}", f"{section[key]!r} is not valid; valid values are {list(choices)}")


def _check_known_keys(config, schema, path: str) -> None:
    """`config` has exactly the keys of `schema` (recursing into sections, not into model.mixers)."""
    for key in schema.keys():
        if key not in config:
            _fail(
                f"{path}.{key}" if path else key,
                "missing; build configs from hybrid_jax.config.get_default_config()",
            )
    for key in config.keys():
        full = f"{path}.{key}" if path else key
        if key not in schema:
            _fail(
                full,
                f"unknown config key; valid keys{' in ' + path if path else ''} are {sorted(schema.keys())}",
            )
        if full != "model.mixers" and isinstance(schema[key], ConfigDict):
            if not isinstance(config[key], ConfigDict):
                _fail(full, f"must be a config section, got {config[key]!r}")
            _check_known_keys(config[key], schema[key], full)


def resolved_mixers(model_cfg) -> dict[str, ConfigDict]:
    """Every letter's mixer config with defaults filled in and checked against `model.d_model`."""
    resolved = {}
    for letter, cfg in model_cfg.mixers.items():
        try:
            resolved[letter] = resolve_mixer_config(cfg, model_cfg.d_model)
        except ValueError as error:
            kind = cfg.get("kind", "?") if hasattr(cfg, "get") else "?"
            _fail(f"model.mixers.{letter} (kind {kind!r})", str(error))
    return resolved


def validate_model(model_cfg) -> dict[str, ConfigDict]:
    """Checks the `model` section; returns the resolved mixer config of every letter."""
    _check_known_keys(model_cfg, get_default_config().model, "model")
    for key in ("vocab_size", "d_model", "num_layers"):
        _check_int(model_cfg, "model", key, 1)
    pattern, mixers = model_cfg.pattern, model_cfg.mixers
    if not isinstance(pattern, str) or not pattern:
        _fail("model.pattern", f"must be a non-empty string of mixer letters, got {pattern!r}")
    if not hasattr(mixers, "keys") or not mixers:
        _fail("model.mixers", f"must map each pattern letter to a mixer config, got {mixers!r}")
    for letter in mixers.keys():
        if len(letter) != 1:
            _fail("model.mixers", f"key {letter!r} must be a single pattern letter")
    for letter in pattern:
        if letter not in mixers:
            _fail(
                "model.pattern",
                f"letter {letter!r} has no mixer in model.mixers; defined letters are {sorted(mixers.keys())}",
            )
    if model_cfg.num_layers % len(pattern):
        _fail(
            "model.num_layers",
            f"{model_cfg.num_layers} is not a multiple of the pattern period {len(pattern)} "
            f"(model.pattern={pattern!r}); valid values are multiples of {len(pattern)}",
        )
    _check_choice(model_cfg, "model", "ffn", FFN_KINDS)
    if model_cfg.ffn == "swiglu":
        _check_int(model_cfg, "model", "mlp_dim", 1)
    _check_choice(model_cfg, "model", "dtype", COMPUTE_DTYPES)
    _check_choice(model_cfg, "model", "remat", REMAT_POLICIES)
    if not model_cfg.norm_eps > 0:
        _fail("model.norm_eps", f"must be > 0, got {model_cfg.norm_eps!r}")
    return resolved_mixers(model_cfg)


def _validate_mesh(mesh_cfg) -> None:
    shape, axes = tuple(mesh_cfg.shape), tuple(mesh_cfg.axes)
    if len(shape) != len(axes):
        _fail("mesh.shape", f"{shape} must have one size per mesh axis in mesh.axes={axes}")
    if len(set(axes)) != len(axes):
        _fail("mesh.axes", f"mesh axis names must be unique, got {axes}")
    if (
        any(isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1) for s in shape)
        or shape.count(-1) > 1
    ):
        _fail(
            "mesh.shape", f"sizes must be ints >= 1 with at most one -1 (all remaining devices), got {shape}"
        )
    for rule in mesh_cfg.axis_rules:
        if len(rule) != 2:
            _fail("mesh.axis_rules", f"each rule must be (logical_axis, mesh_axes), got {rule!r}")
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for target in targets:
            if target is not None and target not in axes:
                _fail(
                    "mesh.axis_rules",
                    f"rule {tuple(rule)!r} names mesh axis {target!r}; valid mesh axes are {axes}",
                )


def validate(config) -> ConfigDict:
    """Checks the whole config; raises one ValueError naming the first bad key. Returns `config`."""
    _check_known_keys(config, get_default_config(), "")
    validate_model(config.model)
    for key in (
        "steps",
        "batch_size",
        "seq_len",
        "log_every",
        "eval_every",
        "eval_steps",
        "checkpoint_every",
    ):
        _check_int(config.train, "train", key, 1)
    _check_int(config.train, "train", "warmup_steps", 0)
    if not config.train.learning_rate > 0:
        _fail("train.learning_rate", f"must be > 0, got {config.train.learning_rate!r}")
    tokenizer = config.data.tokenizer
    if tokenizer not in TOKENIZERS and not str(tokenizer).endswith(".model"):
        _fail(
            "data.tokenizer",
            f"{tokenizer!r} is not valid; valid values are {list(TOKENIZERS)} or a SentencePiece .model path",
        )
    _check_int(config.data, "data", "worker_count", 0)
    _validate_mesh(config.mesh)
    return config


def preset_config(preset: str) -> ConfigDict:
    """The default config sized for a preset: width, vocabulary and training shape.

    tiny: byte vocabulary, width 64: builds, trains and tests in seconds on a CPU.
    small / base: GPT-2 BPE vocabulary, widths 256 / 768 (about 25M / 125M parameters for a 12-layer
    transformer). Experiments then set depth, pattern and mixers.
    """
    sizes = {
        "tiny": dict(
            d_model=64,
            mlp_dim=192,
            tokenizer="byte",
            vocab_size=256,
            seq_len=128,
            batch_size=8,
            lr=1e-3,
            steps=300,
        ),
        "small": dict(
            d_model=256,
            mlp_dim=1024,
            tokenizer="gpt2",
            vocab_size=50304,
            seq_len=512,
            batch_size=16,
            lr=6e-4,
            steps=5000,
        ),
        "base": dict(
            d_model=768,
            mlp_dim=2304,
            tokenizer="gpt2",
            vocab_size=50304,
            seq_len=1024,
            batch_size=32,
            lr=3e-4,
            steps=20000,
        ),
    }
    if preset not in sizes:
        raise ValueError(f"unknown preset {preset!r}; valid presets are {list(PRESETS)}")
    size = sizes[preset]
    config = get_default_config()
    config.model.d_model, config.model.mlp_dim = size["d_model"], size["mlp_dim"]
    config.model.vocab_size, config.data.tokenizer = size["vocab_size"], size["tokenizer"]
    config.train.seq_len, config.train.batch_size = size["seq_len"], size["batch_size"]
    config.train.learning_rate, config.train.steps = size["lr"], size["steps"]
    config.train.warmup_steps = max(1, size["steps"] // 20)
    config.train.workdir = f"runs/{preset}"
    return config


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)` (ml_collections config_flags style)."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(
            f"config file {path!r} not found; expected path/to/config.py[:preset], e.g. experiments/configs/transformer.py:tiny"
        )
    name = "hybrid_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec_obj = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    return validate(config)


__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_AXIS_RULES",
    "FFN_KINDS",
    "MESH_AXES",
    "MIXERS",
    "PRESETS",
    "REMAT_POLICIES",
    "get_default_config",
    "layer_pattern",
    "load_config",
    "mixer",
    "preset_config",
    "resolved_mixers",
    "validate",
    "validate_model",
]
