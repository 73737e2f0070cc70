"""The mixer registry: kind name -> layer class, and the interface every mixer layer implements.

A mixer is the sequence-mixing half of a block (attention, MLA, KDA, Mamba-2, ...). To add one:

1. Write `hybrid_jax/nn/<name>.py` with a subclass of `Mixer` decorated by `@register_mixer("<kind>")`:

       @register_mixer("gated_deltanet")
       class GatedDeltaNet(Mixer):
           @classmethod
           def default_config(cls) -> ConfigDict: ...      # every key the layer reads, with defaults
           @classmethod
           def check_config(cls, cfg, d_model) -> None: ... # optional: "<key>: <message>" ValueError
           @classmethod
           def cache_bytes(cls, cfg, d_model, context, dtype_bytes=2) -> int: ...
           @classmethod
           def flops_per_token(cls, cfg, d_model, context) -> int: ...
           def __init__(self, cfg, d_model, *, rngs): ...
           def __call__(self, x, *, segment_ids=None, positions=None): ...  # [B, T, d_model] -> [B, T, d_model]
           def prefill(self, x, *, max_len, lengths=None, segment_ids=None, positions=None): ...  # (y, cache)
           def decode(self, x, cache, position): ...        # x [B, 1, d_model], position [B] -> (y, cache)
           def decode_limit(self, cache): ...                # optional: first position the cache can't hold

2. Add `"<name>"` to `MIXER_MODULES` in `hybrid_jax/nn/__init__.py` (importing the module registers it).
   What several layers share goes in a shared module (base classes in `linear_mixer`, checks in
   `layer_config`, ...): a mixer layer module never imports another one.

Contract:
* `Cls(cfg, d_model, *, rngs)` builds the layer from a *resolved* config (`resolve_mixer_config`:
  defaults filled in, unknown keys rejected, `check_config` passed; `cfg.kind` is the kind name).
  Use `build_mixer` to get all of that in one call.
* `layer(x)` maps `[B, T, d_model]` to `[B, T, d_model]`, is causal (output t depends on inputs
  <= t only), computes in x.dtype, and creates every parameter with `logical_param` (axis names and
  a weight-decay role: "weight", "embedding" or "no_decay", see `hybrid_jax.nn.common`).
* Packed documents: `layer(x, segment_ids=..., positions=...)` (`[B, T]` int32, `hybrid_jax.nn.segments`)
  gives every document the output it gets alone (its op called with `segment_ids`, short convs and
  windows kept inside a document, RoPE by `positions`); without them it computes exactly what it did
  before. `prefill` with them keeps each row's last document for `decode`, as a prompt of that
  document alone would.
* `cache_bytes` is the decode cache / recurrent state one sequence needs at `context` tokens, in
  bytes for elements of `dtype_bytes` (KV cache for attention, latent cache for MLA, state plus
  conv history for linear mixers).
* `flops_per_token` is the forward FLOPs (2 per multiply-add) of one token averaged over a causal
  sequence of `context` tokens: projections plus the mixing itself (for attention, the mean number
  of keys attended), counting the algorithm's mathematical work, not one implementation's.
* Tests: tests/nn/test_mixers.py runs every registered kind (causality, forward + backward, every
  parameter receiving a gradient, the cache/FLOPs interface); add small settings for a new kind to
  its `SMALL` table so that it compiles quickly.

Config key conventions (so experiment configs read the same across kinds): `num_heads`,
`head_dim` (per-head query/key dim; None = derived from d_model), `num_kv_heads`, `expand`
(inner width / d_model), `state_dim` (SSM state size N), `conv_size` (ShortConv kernel),
`chunk_size`, and `impl` (the op's implementation: "chunk", "reference", ...). Optional ints use
`ml_collections.config_dict.placeholder(int)` so command-line overrides keep their type.
Logical axis names: "embed" (d_model), "heads", "kv_heads", "kv" (head dim), "mlp" (inner
channels), "latent" (low-rank bottlenecks), "expert", "norm" (norm scales), "conv" (conv taps).
"""

from __future__ import annotations

from typing import ClassVar

import ml_collections
from flax import nnx

ConfigDict = ml_collections.ConfigDict

MIXERS: dict[str, type] = {}

_REQUIRED = ("default_config", "cache_bytes", "flops_per_token")


class Mixer(nnx.Module):
    """Base class of mixer layers; see the module docstring for the contract."""

    kind: ClassVar[str] = ""
    # Config keys added with a default that changes what a config without them computed, mapped to
    # the value that keeps the old behaviour: a saved run written before the key existed loads with
    # it (`hybrid_jax.inference.load_run_config`), so it decodes as it trained.
    LEGACY_DEFAULTS: ClassVar[dict] = {}

    @classmethod
    def default_config(cls) -> ConfigDict:
        raise NotImplementedError(f"{cls.__name__}.default_config")

    @classmethod
    def check_config(cls, cfg: ConfigDict, d_model: int) -> None:
        """Raises ValueError naming the field when `cfg` cannot build a layer of width d_model."""

    @classmethod
    def cache_bytes(cls, cfg: ConfigDict, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        raise NotImplementedError(f"{cls.__name__}.cache_bytes")

    @classmethod
    def flops_per_token(cls, cfg: ConfigDict, d_model: int, context: int) -> int:
        raise NotImplementedError(f"{cls.__name__}.flops_per_token")

    def decode_limit(self, cache) -> int | None:
        """The first position this layer's decode `cache` cannot decode exactly; None: every position.

        Read from shapes only (so it works under jit), on the trailing axes: the cache may be stacked
        over periods. Layers whose cache is sized by the prefill's `max_len` override this.
        """
        del cache
        return None


def register_mixer(kind: str):
    """Class decorator adding a `Mixer` subclass to `MIXERS` under `kind`."""

    def register(cls: type) -> type:
        if kind in MIXERS and MIXERS[kind] is not cls:
            raise ValueError(f"mixer kind {kind!r} is already registered to {MIXERS[kind].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"register_mixer({kind!r}): {cls!r} must subclass hybrid_jax.nn.registry.Mixer")
        missing = [name for name in _REQUIRED if getattr(cls, name).__func__ is getattr(Mixer, name).__func__]
        if missing:
            raise TypeError(f"register_mixer({kind!r}): {cls.__qualname__} must define {missing}")
        cls.kind = kind
        MIXERS[kind] = cls
        return cls

    return register


def get_mixer(kind: str) -> type:
    """The registered class for `kind`; a ValueError lists the registered kinds."""
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer kind {kind!r}; registered kinds are {sorted(MIXERS)}")
    return MIXERS[kind]


def mixer_config(kind: str, **overrides) -> ConfigDict:
    """`kind`'s default config with `overrides` applied and `kind` set; a locked ConfigDict.

    Raises ValueError for an unregistered kind, a key the kind does not define (naming the valid
    keys) or a value of the wrong type. Width-dependent checks wait for `resolve_mixer_config`.
    """
    cls = get_mixer(kind)
    resolved = cls.default_config()
    if "kind" in resolved:
        raise TypeError(f"{cls.__qualname__}.default_config() must not define 'kind' (the registry sets it)")
    unknown = sorted(set(overrides) - set(resolved.keys()))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} for mixer kind {kind!r}; valid keys are {sorted(resolved.keys())}"
        )
    for key, value in overrides.items():
        try:
            setattr(resolved, key, value)
        except TypeError as error:
            raise ValueError(f"mixer kind {kind!r}: {key}={value!r} has the wrong type: {error}") from None
    resolved.unlock()
    resolved.kind = kind
    resolved.lock()
    return resolved


def resolve_mixer_config(cfg, d_model: int) -> ConfigDict:
    """`mixer_config(**cfg)` (cfg a ConfigDict or dict with a `kind`) plus the kind's `check_config`."""
    items = dict(cfg.items()) if hasattr(cfg, "items") else None
    if items is None or "kind" not in items:
        raise ValueError(
            f"a mixer config must be a dict with a 'kind' key, one of {sorted(MIXERS)}; got {cfg!r}"
        )
    resolved = mixer_config(items.pop("kind"), **items)
    get_mixer(resolved.kind).check_config(resolved, d_model)
    return resolved


def build_mixer(cfg, d_model: int, *, rngs: nnx.Rngs) -> Mixer:
    """Resolves `cfg` and builds its layer for width `d_model`."""
    resolved = resolve_mixer_config(cfg, d_model)
    return get_mixer(resolved.kind)(resolved, d_model, rngs=rngs)
