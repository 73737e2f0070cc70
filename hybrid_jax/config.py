"""The config schema: defaults, validation, layer-pattern parsing and config-file loading.

A config has four sections:

* `model`  the network: width, depth, vocabulary, and the layer pattern. `model.pattern` is a string
           of letters, one per layer of a period; `model.mixers` maps each letter to a mixer config
           (`mixer(kind, **overrides)`); the period repeats to `model.num_layers` layers. Every block
           is pre-norm: x += mixer(norm(x)); x += ffn(norm(x)) (no FFN when `model.ffn = "none"`).
* `train`  optimisation and loop settings; `data` the corpus and tokenizer or a synthetic task
           (`hybrid_jax.data.schema`); `mesh` the device mesh
           (`mesh.shape` over `mesh.axes`, -1 = all remaining devices) and the rules mapping the
           logical parameter axes (`hybrid_jax.nn.common`) onto mesh axes.

`get_default_config()` is locked: assigning a key that does not exist raises at once. `validate`
raises one ValueError per problem, `"<key>: <message>"` naming the key and its valid values
(`hybrid_jax.checks`); it holds every check of the config, the trainer's included, so that a config
it passes (given the run's device and process counts) fails in training only for what a config
cannot know: a missing data path, a tokenizer larger than `model.vocab_size`, a workdir whose
checkpoints are newer than `train.steps`. Experiment files
(`experiments/configs/*.py`) define `get_config(preset)` and are loaded with `load_config("path:preset")`.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from hybrid_jax.checks import (
    check_choice,
    check_divides,
    check_int,
    check_known_keys,
    check_optimiser,
    check_positive_number,
    fail,
    is_int,
)
from hybrid_jax.data.schema import default_data_section, validate_data_section
from hybrid_jax.nn import MIXERS, mixer_config, resolve_mixer_config
from hybrid_jax.nn.moe import FFN_KINDS, check_moe_config, default_moe_config

ConfigDict = ml_collections.ConfigDict

COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots")
PRESETS = ("tiny", "small", "base")

# Mesh axes of the training loop; logical parameter axes map onto them (None = replicated).
MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")
DEFAULT_AXIS_RULES = (
    # The time axis of activations: context parallelism splits it over "context" (hybrid_jax.nn.context).
    ("length", "context"),
    # Rows also split over the expert axis: expert parallelism reuses those devices for the rest.
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("latent", None),
    ("expert", "expert"),
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
            "moe": default_moe_config(),  # read when ffn = "moe" (hybrid_jax.nn.moe)
            # Which layers are MoE when ffn = "moe": layer l >= first_dense_layers with l % every == offset
            # (the others keep the dense SwiGLU of mlp_dim); `every` must divide the pattern period.
            "moe_layers": {"first_dense_layers": 0, "every": 1, "offset": 0},
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
    config.data = ConfigDict(default_data_section())  # keys and checks: hybrid_jax.data.schema
    config.mesh = ConfigDict({"shape": (-1, 1, 1, 1, 1), "axes": MESH_AXES, "axis_rules": DEFAULT_AXIS_RULES})
    config.lock()
    return config


_DEFAULTS = "hybrid_jax.config.get_default_config()"


def layer_pattern(model_cfg) -> list[str]:
    """The mixer letter of every layer: `model.pattern` repeated to `model.num_layers`."""
    period = len(model_cfg.pattern)
    return list(model_cfg.pattern) * (model_cfg.num_layers // period)


def resolved_mixers(model_cfg) -> dict[str, ConfigDict]:
    """Every letter's mixer config with defaults filled in and checked against `model.d_model`."""
    resolved = {}
    for letter, cfg in model_cfg.mixers.items():
        try:
            resolved[letter] = resolve_mixer_config(cfg, model_cfg.d_model)
        except ValueError as error:
            kind = cfg.get("kind", "?") if hasattr(cfg, "get") else "?"
            fail(f"model.mixers.{letter} (kind {kind!r})", str(error))
    return resolved


def _check_pattern(model_cfg) -> None:
    pattern, mixers = model_cfg.pattern, model_cfg.mixers
    if not isinstance(pattern, str) or not pattern:
        fail("model.pattern", f"must be a non-empty string of mixer letters, got {pattern!r}")
    if not hasattr(mixers, "keys") or not mixers:
        fail("model.mixers", f"must map each pattern letter to a mixer config, got {mixers!r}")
    for letter in mixers.keys():
        if len(letter) != 1:
            fail("model.mixers", f"key {letter!r} must be a single pattern letter")
    for letter in pattern:
        if letter not in mixers:
            fail("model.pattern",
                 f"letter {letter!r} has no mixer in model.mixers; defined letters are {sorted(mixers.keys())}")
    if model_cfg.num_layers % len(pattern):
        fail("model.num_layers",
             f"{model_cfg.num_layers} is not a multiple of the pattern period {len(pattern)} "
             f"(model.pattern={pattern!r}); valid values are multiples of {len(pattern)}")


def _check_moe_layers(model_cfg) -> None:
    rule, prefix = model_cfg.moe_layers, "model.moe_layers"
    check_int(rule, "first_dense_layers", minimum=0, prefix=prefix)
    every = check_int(rule, "every", prefix=prefix)
    check_int(rule, "offset", minimum=0, prefix=prefix)
    period = len(model_cfg.pattern)
    if period % every:  # MoE-ness must repeat with the pattern, or the period scan would need two bodies
        fail(f"{prefix}.every", f"{every} must divide the pattern period {period} (model.pattern="
             f"{model_cfg.pattern!r})")
    if rule.offset >= every:
        fail(f"{prefix}.offset", f"{rule.offset} must be < every ({every})")
    if not any(kind == "moe" for kind in ffn_plan(model_cfg)):
        fail(prefix, f"selects no MoE layer among the {model_cfg.num_layers} layers")


def ffn_plan(model_cfg) -> list[str]:
    """The feed-forward kind of every layer: "moe" where `model.moe_layers` selects it (ffn = "moe"),
    the dense "swiglu" elsewhere; `model.ffn` itself when it is not "moe"."""
    if model_cfg.ffn != "moe":
        return [model_cfg.ffn] * model_cfg.num_layers
    rule = model_cfg.moe_layers
    return ["moe" if layer >= rule.first_dense_layers and layer % rule.every == rule.offset else "swiglu"
            for layer in range(model_cfg.num_layers)]


def validate_model(model_cfg) -> dict[str, ConfigDict]:
    """Checks the `model` section; returns the resolved mixer config of every letter."""
    check_known_keys(model_cfg, get_default_config().model, "model", defaults=_DEFAULTS, opaque=("model.mixers",))
    for key in ("vocab_size", "d_model", "num_layers"):
        check_int(model_cfg, key, prefix="model")
    _check_pattern(model_cfg)
    check_choice(model_cfg, "ffn", FFN_KINDS, prefix="model")
    if model_cfg.ffn in ("swiglu", "moe"):
        check_int(model_cfg, "mlp_dim", prefix="model")
    if model_cfg.ffn == "moe":
        check_moe_config(model_cfg.moe)
        _check_moe_layers(model_cfg)
    check_choice(model_cfg, "dtype", COMPUTE_DTYPES, prefix="model")
    check_choice(model_cfg, "remat", REMAT_POLICIES, prefix="model")
    check_positive_number(model_cfg, "norm_eps", prefix="model")
    return resolved_mixers(model_cfg)


def validate_mesh(mesh_cfg) -> None:
    """`mesh.shape` gives one size per axis of `mesh.axes`; each rule maps a logical axis once, onto
    mesh axes that exist."""
    shape, axes = tuple(mesh_cfg.shape), tuple(mesh_cfg.axes)
    if len(shape) != len(axes):
        fail("mesh.shape", f"{shape} must have one size per mesh axis in mesh.axes={axes}")
    if len(set(axes)) != len(axes):
        fail("mesh.axes", f"mesh axis names must be unique, got {axes}")
    if any(not is_int(s) or (s < 1 and s != -1) for s in shape) or shape.count(-1) > 1:
        fail("mesh.shape", f"sizes must be ints >= 1 with at most one -1 (all remaining devices), got {shape}")
    seen = set()
    for rule in mesh_cfg.axis_rules:
        if len(rule) != 2:
            fail("mesh.axis_rules", f"each rule must be (logical_axis, mesh_axes), got {rule!r}")
        if rule[0] in seen:
            fail("mesh.axis_rules", f"logical axis {rule[0]!r} has more than one rule")
        seen.add(rule[0])
        for target in rule_targets(rule[1]):
            if target not in axes:
                fail("mesh.axis_rules", f"rule {tuple(rule)!r} names mesh axis {target!r}; valid mesh axes are {axes}")
        if rule[0] == "length" and rule_targets(rule[1]) not in ((), ("context",)):
            fail("mesh.axis_rules", f"rule {tuple(rule)!r}: the time axis splits over the 'context' mesh axis "
                 "only (context parallelism, hybrid_jax.nn.context); valid targets are 'context' or None")


def rule_targets(target) -> tuple[str, ...]:
    """The mesh axes of one axis rule's target: a name, a tuple of names, or None (replicated)."""
    targets = tuple(target) if isinstance(target, (tuple, list)) else (target,)
    return tuple(t for t in targets if t is not None)


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
    """`mesh.shape` with its -1 entry (if any) replaced so that the sizes multiply to `num_devices`."""
    shape = tuple(int(s) for s in shape)
    fixed = math.prod(s for s in shape if s != -1)
    if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        fail("mesh.shape", f"{shape}: sizes must be >= 1 with at most one -1")
    if -1 in shape:
        if num_devices % fixed:
            fail("mesh.shape", f"{shape}: the fixed axes ({fixed} devices) do not divide the {num_devices} "
                 "available devices")
        shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        fail("mesh.shape", f"{shape} needs {math.prod(shape)} devices but {num_devices} are available; "
             "use -1 for one axis to take all remaining devices")
    return shape


def _check_batch_layout(config, device_count: int | None, process_count: int) -> None:
    """Each micro-batch's rows split evenly over the batch shards (the mesh axes of the "batch" rule)
    and the processes. Without `device_count` a -1 mesh size is unknown: the shards are then checked
    only when no batch axis is -1."""
    tc, mesh_cfg = config.train, config.mesh
    shape = tuple(mesh_cfg.shape) if device_count is None else resolve_mesh_shape(mesh_cfg.shape, device_count)
    sizes = dict(zip(mesh_cfg.axes, shape))
    batch_axes = next((rule_targets(target) for name, target in mesh_cfg.axis_rules if name == "batch"), ())
    shards = math.prod(sizes[axis] for axis in batch_axes)
    rows = tc.batch_size // tc.grad_accum_steps
    if shards > 0 and rows % shards:  # an unresolved -1 size makes the product negative: unknown
        fail("train.batch_size", f"{tc.batch_size} / grad_accum_steps {tc.grad_accum_steps} = {rows} rows per "
             f"micro-batch must divide over the {shards} batch shards of mesh {sizes}")
    if tc.batch_size % process_count:
        fail("train.batch_size", f"{tc.batch_size} must divide over {process_count} processes")
    length_axes = next((rule_targets(target) for name, target in mesh_cfg.axis_rules if name == "length"), ())
    context = math.prod(sizes[axis] for axis in length_axes)
    if context > 1 and tc.seq_len % context:
        fail("train.seq_len", f"{tc.seq_len} must divide over the {context} shards of the 'context' mesh axis "
             "(context parallelism splits every row's time axis evenly)")


def _validate_train(tc) -> None:
    """The `train` section, including what only the trainer and the optimiser read."""
    for key in ("batch_size", "grad_accum_steps", "seq_len", "log_every", "eval_every", "eval_steps",
                "checkpoint_every", "keep_checkpoints"):
        check_int(tc, key, prefix="train")
    check_optimiser(tc, "train")
    check_int(tc, "seed", minimum=0, prefix="train")
    if tc.seed >= 2**32:  # grain's shuffle seed is 32 bits
        fail("train.seed", f"must be < 2**32, got {tc.seed}")
    check_divides("train.grad_accum_steps", tc.grad_accum_steps, "train.batch_size", tc.batch_size)
    check_choice(tc, "decay_embeddings", (True, False), prefix="train")


def validate(config, *, device_count: int | None = None, process_count: int = 1) -> ConfigDict:
    """Checks the whole config; raises one ValueError naming the first bad key. Returns `config`.

    Given `device_count` (the devices the mesh will span) and `process_count`, it also checks what
    the devices decide: the mesh shape, and that each micro-batch of batch_size / grad_accum_steps
    rows splits evenly over the batch shards and the processes. A config that passes with the run's
    counts fails in `hybrid_jax.train.train` only for what the config cannot know (the data path,
    the tokenizer's vocabulary, the checkpoints already in the workdir).
    """
    check_known_keys(config, get_default_config(), "", defaults=_DEFAULTS, opaque=("model.mixers",))
    validate_model(config.model)
    _validate_train(config.train)
    validate_data_section(config.data, seq_len=config.train.seq_len, vocab_size=config.model.vocab_size,
                          batch_size=config.train.batch_size)
    validate_mesh(config.mesh)
    _check_batch_layout(config, device_count, process_count)
    return config


def preset_config(preset: str) -> ConfigDict:
    """The default config sized for a preset: width, vocabulary and training shape.

    tiny: byte vocabulary, width 64: builds, trains and tests in seconds on a CPU.
    small / base: GPT-2 BPE vocabulary, widths 256 / 768 (about 25M / 125M parameters for a 12-layer
    transformer). Experiments then set depth, pattern and mixers.
    """
    sizes = {
        "tiny": dict(d_model=64, mlp_dim=192, tokenizer="byte", vocab_size=256, seq_len=128, batch_size=8,
                     lr=1e-3, steps=300),
        "small": dict(d_model=256, mlp_dim=1024, tokenizer="gpt2", vocab_size=50304, seq_len=512, batch_size=16,
                      lr=6e-4, steps=5000),
        "base": dict(d_model=768, mlp_dim=2304, tokenizer="gpt2", vocab_size=50304, seq_len=1024, batch_size=32,
                     lr=3e-4, steps=20000),
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


def config_module(path: str):
    """The config file at `path` as a module, by path: a config file can build on another one beside
    it (`config_module(os.path.join(os.path.dirname(__file__), "kimi_linear.py"))`) wherever it lives."""
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(
            f"config file {path!r} not found; expected path/to/config.py[:preset], e.g. experiments/configs/transformer.py:tiny"
        )
    name = "hybrid_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec_obj = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    return module


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)` (ml_collections config_flags style)."""
    path, _, arg = spec.partition(":")
    module = config_module(path)
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
    "config_module",
    "ffn_plan",
    "get_default_config",
    "layer_pattern",
    "load_config",
    "mixer",
    "preset_config",
    "resolve_mesh_shape",
    "resolved_mixers",
    "rule_targets",
    "validate",
    "validate_mesh",
    "validate_model",
]
