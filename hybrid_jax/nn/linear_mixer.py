r"""What every linear mixer layer shares: the `LinearMixer` base class, its cache and its decoding.

A linear mixer (linear attention, GLA, Mamba, Mamba-2, the delta-rule family and their log-linear
versions) carries a fixed-size recurrent state instead of a KV cache. This base class gives them
`cache_bytes`, `flops_per_token`, `__call__`, `prefill` and `decode` from a few class methods and
hooks.

Cost model. The decode cache is the short-conv history in the activation dtype
((W - 1) * channels * dtype_bytes) plus the recurrent state in float32 (`STATE_BYTES` = 4 per
element, because the ops accumulate states in float32 whatever the input dtype). FLOPs per token are
2 per parameter (every weight multiplies once per token: projections, convolution taps, per-head
maps) plus the mixer's own state work, `mixing_flops`, counted as 2 per multiply-add and 1 per
elementwise decay.

Decoding, through four hooks:

    project(x, conv_states)   -> the op's inputs over x `[B, T, d]` and the new short-conv histories
    pad_as_identity(inputs)   -> ragged prompts: padded steps become identity steps (k = 0 / dt = 0 /
                                 beta = 0, g = 0), so the state after T steps is the state after L_b
    mix / mix_step            -> the chunked op over T tokens (final state returned) / the op's `*_step`
    finish(o, x)              -> output norm, gate and projection

The training path is `finish(mix(project(x)))`; `prefill` runs the same chunked op over the prompt
and keeps its final state, `decode` feeds one token through `project` (with the conv histories) and
the op's one-token step. The cache is `RecurrentCache(state, conv)`.

Packed documents: `__call__` and `prefill` take `segment_ids` `[B, T]` (`hybrid_jax.nn.segments`),
which `project` hands to the short convolutions and `mix` to the op (`segment_option`: the op is
called exactly as before when there are none). The op's state then restarts with every document and
its final state is that of the last document, so a packed prefill decodes on from its last document
(the model passes `lengths` = the last real token + 1 with the segments, which the conv histories
end at). The linear mixers take `positions` for uniformity and ignore them: they carry position in
their state.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.nn.common import count_params
from hybrid_jax.nn.registry import Mixer
from hybrid_jax.nn.segments import segment_option

STATE_BYTES = 4  # recurrent states are float32 (see the module docstring)


class RecurrentCache(NamedTuple):
    """Decode cache of a linear mixer: its recurrent state and the histories of its short convs."""

    state: Any  # float32: [B, HV, K, V] (Mamba: [B, D, N]; log-linear layers: a FenwickState)
    conv: tuple  # one [B, W-1, C] history per short conv (compute dtype); () without convs


def zero_where_invalid(x: jax.Array | None, valid: jax.Array) -> jax.Array | None:
    """x `[B, T, ...]` with the steps where valid `[B, T]` is False set to zero."""
    if x is None:
        return None
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


def at_step(inputs: tuple) -> tuple:
    """`[B, 1, ...]` inputs of a decoding step -> `[B, ...]` (None stays None)."""
    return tuple(None if x is None else x[:, 0] for x in inputs)


class LinearMixer(Mixer):
    """Shared cache, FLOPs and decoding of the linear mixers (see the module docstring).

    Subclasses define `conv_channels` (0 without a short conv), `conv_size`, `state_elements`,
    `mixing_flops`, and the hooks `project`, `pad_as_identity`, `mix`, `mix_step`, `finish`.
    """

    @classmethod
    def conv_channels(cls, cfg, d_model: int) -> int:
        return 0

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        raise NotImplementedError(f"{cls.__name__}.state_elements")

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        raise NotImplementedError(f"{cls.__name__}.mixing_flops")

    @classmethod
    def cache_bytes(cls, cfg, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        history = (cfg.conv_size - 1) * cls.conv_channels(cfg, d_model) if "conv_size" in cfg else 0
        return history * dtype_bytes + cls.state_elements(cfg, d_model, context) * STATE_BYTES

    @classmethod
    def flops_per_token(cls, cfg, d_model: int, context: int) -> int:
        abstract = nnx.eval_shape(lambda: cls(cfg, d_model, rngs=nnx.Rngs(0)))
        return int(round(2 * count_params(abstract) + cls.mixing_flops(cfg, d_model, context)))

    def project(self, x: jax.Array, conv_states: tuple | None = None, *, lengths=None,
                segment_ids=None) -> tuple[tuple, tuple]:
        """(op inputs `[B, T, ...]`, new conv histories) for x `[B, T, d_model]`; the short convs keep
        the documents of `segment_ids` apart."""
        raise NotImplementedError(f"{type(self).__name__}.project")

    def pad_as_identity(self, inputs: tuple, valid: jax.Array) -> tuple:
        """`inputs` with the steps where valid `[B, T]` is False made identity steps."""
        raise NotImplementedError(f"{type(self).__name__}.pad_as_identity")

    def mix(self, x: jax.Array, inputs: tuple, *, final: bool = False, max_len=None, lengths=None,
            segment_ids=None):
        """(o `[B, T, ...]`, final state if `final` else None): the chunked op over the inputs, its
        state restarting with each document of `segment_ids`."""
        raise NotImplementedError(f"{type(self).__name__}.mix")

    def mix_step(self, x: jax.Array, inputs: tuple, state):
        """(o `[B, 1, ...]`, new state): the op's one-token step on `[B, 1, ...]` inputs."""
        raise NotImplementedError(f"{type(self).__name__}.mix_step")

    def finish(self, o: jax.Array, x: jax.Array) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__}.finish")

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        del positions  # the state carries position
        inputs, _ = self.project(x, **segment_option(segment_ids))
        o, _ = self.mix(x, inputs, **segment_option(segment_ids))
        return self.finish(o, x)

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None = None,
                segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
        """Output over the prompt x `[B, T, d_model]` and the `RecurrentCache` after each row's prompt
        (its last document, given `segment_ids`)."""
        del positions
        inputs, conv = self.project(x, lengths=lengths, **segment_option(segment_ids))
        if lengths is not None:
            inputs = self.pad_as_identity(inputs, jnp.arange(x.shape[1])[None, :] < lengths[:, None])
        o, state = self.mix(x, inputs, final=True, max_len=max_len, lengths=lengths, **segment_option(segment_ids))
        return self.finish(o, x), RecurrentCache(state, conv)

    def decode(self, x: jax.Array, cache: RecurrentCache, position: jax.Array):
        """One token per row, x `[B, 1, d_model]`; the state carries what position means."""
        del position
        inputs, conv = self.project(x, cache.conv)
        o, state = self.mix_step(x, inputs, cache.state)
        return self.finish(o, x), RecurrentCache(state, conv)
