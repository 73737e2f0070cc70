r"""Causal depthwise short convolution (the ShortConv of Mamba, GDN, KDA), with a decode state, and
the convolved projections act(ShortConv(x W)) of the linear mixers.

For channel c and kernel size W (weights w[0..W-1], w[W-1] multiplying the current token):

    y_t[c] = act( sum_{i=0}^{W-1} w[i, c] * x_{t-W+1+i}[c]  (+ b[c]) ),   x_s = 0 for s < 0

The decode state is the last W-1 inputs `[B, W-1, C]` (oldest first). Running `__call__` over a
sequence with a state, or `step` token by token, gives the same outputs and the same final state, so
a prefill can hand its state to decoding. For a batch of right-padded sequences, `lengths` `[B]`
makes the returned state each row's last W-1 *valid* inputs (outputs at valid positions never see
the padding, which comes after them). The convolution is W shifted multiply-adds (W is ~4), which
XLA fuses; no im2col or FFT is worth it at this width. Products accumulate in float32; y and the
state come back in the input dtype.

Packed documents: with `segment_ids` `[B, T]` (documents as runs of one id, `hybrid_jax.ops.segments`)
a token sees only the taps of its own document, tap x_{t-k} (k >= 1) counting iff k <= position[t]
(the position within the document); the history (a given state) belongs to the document of token 0
only. The new state is the last W-1 inputs of the document ending at token `lengths[b] - 1` (default:
the last real token), zero before that document's start: the state a prompt of that document alone
leaves.

Context parallelism (`hybrid_jax.nn.context`: the time axis split over a mesh axis): a shard's
history is the previous shard's last W-1 inputs (and their segment ids), one `ppermute` halo
(`hybrid_jax.ops.context.previous_tokens`; zeros on shard 0, as before token 0 of a row).

`ConvProjection` is a Dense followed by a ShortConv over the flattened output dims. The published
layers convolve one concatenation of several projections (Mamba-2's (x, B, C), the q, k, v of the
delta-rule layers); a depthwise conv of a concatenation is the concatenation of the convs, so each
stream keeps its own Dense and ShortConv, with its own logical axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_jax.nn.common import NO_DECAY, WEIGHT, Dense, activation, logical_param
from hybrid_jax.nn.context import context_axis
from hybrid_jax.ops.context import previous_tokens
from hybrid_jax.ops.segments import document_start


class ShortConv(nnx.Module):
    """Depthwise causal conv over time for `x` `[B, T, C]`; returns `(y, new_state)`."""

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 4,
        activation_name: str = "silu",
        use_bias: bool = False,
        axis_name: str | None = "mlp",
        rngs: nnx.Rngs,
    ):
        if kernel_size < 1:
            raise ValueError(f"ShortConv: kernel_size must be >= 1, got {kernel_size}")
        activation(activation_name)  # fail at construction on an unknown name
        self.channels, self.kernel_size, self.activation_name = channels, kernel_size, activation_name
        # Uniform(-1/sqrt(W), 1/sqrt(W)): PyTorch's Conv1d default for a depthwise kernel (fan-in W).
        bound = 1.0 / math.sqrt(kernel_size)
        weight = jax.random.uniform(rngs.params(), (kernel_size, channels), jnp.float32, -bound, bound)
        self.weight = logical_param(weight, ("conv", axis_name), role=WEIGHT)
        bias = jnp.zeros((channels,), jnp.float32)
        self.bias = logical_param(bias, (axis_name,), role=NO_DECAY) if use_bias else None

    def init_state(self, batch: int, dtype=jnp.float32) -> jax.Array:
        """The all-zero state (no history) `[B, W-1, C]`."""
        return jnp.zeros((batch, self.kernel_size - 1, self.channels), dtype)

    def _check(self, x: jax.Array, conv_state: jax.Array | None, rank: int, layout: str) -> None:
        if x.ndim != rank or x.shape[-1] != self.channels:
            raise ValueError(
                f"ShortConv: x must have shape {layout} with C={self.channels}, got {tuple(x.shape)}"
            )
        expected = (x.shape[0], self.kernel_size - 1, self.channels)
        if conv_state is not None and tuple(conv_state.shape) != expected:
            raise ValueError(
                f"ShortConv: conv_state must have shape [B, W-1, C] = {expected}, got {tuple(conv_state.shape)}"
            )

    def _finish(self, y: jax.Array) -> jax.Array:
        if self.bias is not None:
            y = y + self.bias[...]
        return activation(self.activation_name)(y)

    def __call__(
        self, x: jax.Array, conv_state: jax.Array | None = None, *, lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """x `[B, T, C]`, optional state `[B, W-1, C]` -> (y `[B, T, C]`, new state `[B, W-1, C]`).

        `lengths` `[B]` (ints in [0, T]): the new state ends at each row's `lengths[b]`-th input.
        `segment_ids` `[B, T]`: packed documents, kept apart (module docstring).
        """
        self._check(x, conv_state, 3, "[B, T, C]")
        if context_axis() is not None:
            return self._context_parallel(x, conv_state, lengths, segment_ids, context_axis())
        width, t = self.kernel_size, x.shape[1]
        history = self.init_state(x.shape[0], x.dtype) if conv_state is None else conv_state.astype(x.dtype)
        padded = jnp.concatenate([history, x], axis=1)  # [B, W-1+T, C]
        taps = padded.astype(jnp.float32)  # accumulate the W products in float32
        if segment_ids is None:
            y = sum(taps[:, i : i + t] * self.weight[i] for i in range(width))
        else:
            y = self._segment_taps(taps, segment_ids)
        if lengths is None and segment_ids is None:
            return self._finish(y).astype(x.dtype), padded[:, padded.shape[1] - (width - 1) :]
        if lengths is not None:
            ends = jnp.asarray(lengths, jnp.int32)
        else:  # the row's last real (non-padding) token
            ends = jnp.max(jnp.where(segment_ids != 0, jnp.arange(1, t + 1, dtype=jnp.int32), 0), axis=1)
        # inputs lengths-W+1 .. lengths-1 sit at padded rows lengths .. lengths+W-2
        rows = ends[:, None] + jnp.arange(width - 1)
        new_state = jnp.take_along_axis(padded, rows[:, :, None], axis=1)
        if segment_ids is not None:  # only the last document's inputs (its history if it starts at 0)
            start = jnp.take_along_axis(document_start(segment_ids), jnp.maximum(ends - 1, 0)[:, None], axis=1)
            mine = (rows - (width - 1) >= start) | (start == 0)
            new_state = jnp.where(mine[:, :, None], new_state, jnp.zeros((), x.dtype))
        return self._finish(y).astype(x.dtype), new_state

    def _context_parallel(self, x, conv_state, lengths, segment_ids, axis: str):
        """This shard's outputs, its history the halo of the previous shard's last W-1 inputs; the
        returned state is this shard's last W-1 inputs."""
        if conv_state is not None or lengths is not None:
            raise ValueError("ShortConv: under context parallelism the conv runs the training path only "
                             "(no conv_state, no lengths); prefill and decode run unsplit")
        width = self.kernel_size
        if width == 1:
            return self._finish(x.astype(jnp.float32) * self.weight[0]).astype(x.dtype), x[:, :0]
        halo = previous_tokens(x, width - 1, axis)
        taps = jnp.concatenate([halo, x], axis=1).astype(jnp.float32)
        if segment_ids is None:
            y = sum(taps[:, i : i + x.shape[1]] * self.weight[i] for i in range(width))
        else:  # the halo's tokens open the row, with their own document ids
            ids = jnp.concatenate([previous_tokens(segment_ids, width - 1, axis), segment_ids], axis=1)
            zeros = jnp.zeros_like(taps[:, : width - 1])
            y = self._segment_taps(jnp.concatenate([zeros, taps], axis=1), ids)[:, width - 1 :]
        return self._finish(y).astype(x.dtype), x[:, x.shape[1] - (width - 1) :]

    def _segment_taps(self, taps: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """sum_i w[i] x_{t-k}, k = W-1-i, over the taps of token t's own document (float32)."""
        width, t = self.kernel_size, segment_ids.shape[1]
        starts = document_start(segment_ids)
        position = jnp.arange(t, dtype=jnp.int32) - starts
        first_document = starts == 0  # its earlier taps, history included, are its own
        y = 0.0
        for i in range(width):
            lag = width - 1 - i
            tap = taps[:, i : i + t]
            if lag:
                tap = jnp.where(((lag <= position) | first_document)[:, :, None], tap, 0.0)
            y = y + tap * self.weight[i]
        return y

    def step(self, x_t: jax.Array, conv_state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token: x_t `[B, C]`, state `[B, W-1, C]` -> (y_t `[B, C]`, new state)."""
        self._check(x_t, conv_state, 2, "[B, C]")
        window = jnp.concatenate([conv_state.astype(x_t.dtype), x_t[:, None]], axis=1)  # [B, W, C]
        y_t = jnp.sum(window.astype(jnp.float32) * self.weight[...], axis=1)
        return self._finish(y_t).astype(x_t.dtype), window[:, 1:]


class ConvProjection(nnx.Module):
    """act(ShortConv(x W)): a projection followed by a causal depthwise conv over time.

    `out_shape` / `out_axes` name the projection's output dims (e.g. `(H, K)`, `("heads", "kv")`);
    the conv runs over their flattening, its channel axis named after the leading output axis.
    """

    def __init__(self, d_model: int, out_shape, out_axes, *, conv_size: int, use_bias: bool = False,
                 activation_name: str = "silu", rngs: nnx.Rngs):
        out_shape, out_axes = tuple(out_shape), tuple(out_axes)
        self.proj = Dense(d_model, out_shape, ("embed",) + out_axes, rngs=rngs)
        self.conv = ShortConv(math.prod(out_shape), kernel_size=conv_size, activation_name=activation_name,
                              use_bias=use_bias, axis_name=out_axes[0], rngs=rngs)

    def with_state(self, x: jax.Array, conv_state: jax.Array | None = None, *, lengths=None, segment_ids=None):
        """(y, new conv history `[B, W-1, C]`) continuing from `conv_state` (see `ShortConv`)."""
        h = self.proj(x)
        y, state = self.conv(h.reshape(h.shape[:2] + (-1,)), conv_state, lengths=lengths, segment_ids=segment_ids)
        return y.reshape(h.shape), state

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.with_state(x)[0]


def conv_projections(projections, x: jax.Array, conv_states: tuple | None, lengths,
                     segment_ids: jax.Array | None = None) -> tuple[tuple, tuple]:
    """Runs each `ConvProjection` on x from its history in `conv_states` (None: empty histories), the
    documents of `segment_ids` kept apart; returns (outputs, new histories)."""
    states = (None,) * len(projections) if conv_states is None else conv_states
    pairs = [proj.with_state(x, state, lengths=lengths, segment_ids=segment_ids)
             for proj, state in zip(projections, states)]
    return tuple(y for y, _ in pairs), tuple(state for _, state in pairs)
