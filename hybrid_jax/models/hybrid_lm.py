r"""HybridLM: a decoder-only language model whose layers follow a pattern of mixers.

    h_0 = Embed(tokens)                                          [B, T, d]   (cast to model.dtype)
    for layer l (mixer m_l = model.mixers[pattern[l mod P]]):
        h <- h + m_l(RMSNorm(h))
        h <- h + FFN_l(RMSNorm(h))        SwiGLU, MoE (model.ffn = "moe", layers by model.moe_layers),
                                          or skipped (model.ffn = "none")
    logits = RMSNorm(h) E^T  (tied)  or  RMSNorm(h) W_out        [B, T, vocab]  float32

Depth is folded: the P blocks of one pattern period form a `Period` module, and `num_layers / P`
copies of it are created with `nnx.vmap` (parameters stacked on a leading "layers" axis) and applied
with `nnx.scan`, so the compiled program holds one period whatever the depth. `model.remat`
rematerialises each period in the backward pass ("full": save only the period input; "save_dots":
also keep matmul outputs without batch dims).

MoE layers (`hybrid_jax.nn.moe`). `model.moe_layers` is periodic with the pattern after its first
`first_dense_layers` layers, so the periods holding those ("lead" periods, ceil(first_dense_layers /
P) of them) are built and applied one by one and the rest are scanned as above: the program holds
at most the lead periods plus one scanned period, whatever the depth. `model.forward(tokens)`
returns `(logits, moe_stats)`: per MoE layer the expert load, auxiliary losses, dropped fraction and
the loss penalty (`moe_layer_stats` lists them by layer); `model(tokens)` returns the logits only.
`update_balance_biases(moe_stats)` applies the auxiliary-loss-free bias update of every MoE layer.

Decoding threads one cache per block through the same scan:

    logits, cache = model.prefill(tokens, max_len=S)        tokens [B, T]; logits [B, T, vocab]
    logits, cache = model.decode_step(next_tokens, cache)   next_tokens [B] or [B, 1]; logits [B, vocab]

`DecodeCache.layers` holds one mixer cache per block of the period (KVCache, LatentCache or
RecurrentCache; see each layer), every array stacked over the scanned periods on a leading axis like
the parameters, `DecodeCache.lead` those of the lead periods (unstacked), and `DecodeCache.position` `[B]` the number of tokens each row has consumed. The
prefill runs each mixer's training path (the chunked forms) over the prompt and keeps what decoding
needs; `max_len` bounds prompt plus generated tokens: it is the number of slots S of the ring-buffer
caches (attention KV, MLA latent), which hold position p in slot p mod S, and it sets the levels of
the log-linear layers' Fenwick states. Decoding position p >= S would overwrite position p - S,
which a global attention or MLA layer (or a sliding window wider than S) still reads, and a
Fenwick state has no level for the positions past the next power of two >= max_len; so decoding
past the cache is never silent:

    model.decode_limit(cache)  the first position the cache cannot decode (None: no such layer)
    decode_step                the logits of a row at position >= decode_limit are NaN (inside jit)
    Decoder / generate         raise a ValueError before such a step (the position is known there)
    prefill(tokens)            without max_len raises when a layer's cache is sized by it (global
                               attention, MLA, a window W > T, log-linear); the other recurrent
                               layers and windows W <= T need no room
Ragged prompts: right-pad them to T and pass `lengths` `[B]`; each row's cache then holds exactly
its first `lengths[b]` tokens (attention caches write only those positions, recurrent mixers turn
padded steps into identity steps, log-linear ones shift the row, see `hybrid_jax.nn.log_linear`),
and decoding continues every row at its own position. Logits at padded positions are meaningless.

Packed documents: `model(tokens, segment_ids=..., positions=...)` takes `[B, T]` int32 segment ids
(1, 2, ... per document within a row, 0 = padding) and positions within the documents (default:
counted from each document's first token). Every mixer keeps the documents apart (attention never
crosses them, recurrent states and short convolutions restart with each, `hybrid_jax.nn.segments`),
and RoPE rotates by the positions, so a packed row gives each document the logits it gets alone.
Without either the model runs exactly as unpacked. `prefill(tokens, segment_ids=..., positions=...)`
keeps each row's last document in the cache and decoding continues it at its last position + 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_jax.config import ffn_plan, layer_pattern, validate_model
from hybrid_jax.nn import Dense, Embed, RMSNorm, build_mixer
from hybrid_jax.nn.context import sharded_mixer
from hybrid_jax.nn.common import ModuleList
from hybrid_jax.nn.moe import build_ffn
from hybrid_jax.nn.segments import packed_documents, packed_prompt

# model.remat -> what a rematerialised period keeps for the backward pass (None: no remat).
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_STACK = {nnx.PARTITION_NAME: "layers"}


class DecodeCache(NamedTuple):
    """What decoding carries between tokens (see the module docstring)."""

    layers: tuple  # one mixer cache per block of the period, stacked over scanned periods on axis 0
    position: jax.Array  # [B] int32: tokens consumed per row = position of the next token
    lead: tuple = ()  # the caches of the lead periods (MoE models with first dense layers), one tuple each


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)); `ffn_kind` in FFN_KINDS."""

    def __init__(self, mixer_cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
                 ffn_kind: str, *, rngs: nnx.Rngs):
        d_model, eps = model_cfg.d_model, model_cfg.norm_eps
        self.mixer_norm = RMSNorm(d_model, eps=eps)
        self.mixer = build_mixer(mixer_cfg, d_model, rngs=rngs)
        self.ffn_norm = RMSNorm(d_model, eps=eps) if ffn_kind != "none" else None
        self.ffn = build_ffn(ffn_kind, model_cfg, rngs=rngs)

    def _feed_forward(self, x: jax.Array, dispatch: str | None = None) -> tuple[jax.Array, dict | None]:
        """(x + ffn(norm(x)), the MoE statistics or None)."""
        if self.ffn is None:
            return x, None
        y, stats = self.ffn(self.ffn_norm(x), dispatch=dispatch)
        return x + y, stats

    def __call__(self, x: jax.Array, documents: dict | None = None) -> jax.Array:
        return self.forward(x, documents)[0]

    def forward(self, x: jax.Array, documents: dict | None = None) -> tuple[jax.Array, dict | None]:
        """(the block's output, its MoE statistics or None); `documents`: the mixer's packed-document
        keywords (segment_ids, positions), or None."""
        return self._feed_forward(x + sharded_mixer(self.mixer, self.mixer_norm(x), documents))

    # Decoding never drops a token, whatever the training dispatch (hybrid_jax.nn.moe).
    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None, documents: dict | None = None):
        y, cache = self.mixer.prefill(self.mixer_norm(x), max_len=max_len, lengths=lengths, **(documents or {}))
        return self._feed_forward(x + y, "dropless")[0], cache

    def decode(self, x: jax.Array, cache, position: jax.Array):
        y, cache = self.mixer.decode(self.mixer_norm(x), cache, position)
        return self._feed_forward(x + y, "dropless")[0], cache


class Period(nnx.Module):
    """One period of the layer pattern: a block per pattern letter (with its FFN kind), in order."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, mixers: dict, ffn_kinds: list[str], *,
                 rngs: nnx.Rngs):
        self.blocks = ModuleList(
            [Block(mixers[letter], model_cfg, kind, rngs=rngs) for letter, kind in zip(model_cfg.pattern, ffn_kinds)]
        )

    def __call__(self, x: jax.Array, documents: dict | None = None) -> jax.Array:
        return self.forward(x, documents)[0]

    def forward(self, x: jax.Array, documents: dict | None = None) -> tuple[jax.Array, tuple]:
        """(output, one MoE statistics dict or None per block)."""
        all_stats = []
        for block in self.blocks:
            x, stats = block.forward(x, documents)
            all_stats.append(stats)
        return x, tuple(all_stats)

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None,
                documents: dict | None = None) -> tuple[jax.Array, tuple]:
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, max_len=max_len, lengths=lengths, documents=documents)
            caches.append(cache)
        return x, tuple(caches)

    def decode(self, x: jax.Array, caches: tuple, position: jax.Array) -> tuple[jax.Array, tuple]:
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.decode(x, cache, position)
            new_caches.append(cache)
        return x, tuple(new_caches)


class HybridLM(nnx.Module):
    """Token ids `[B, T]` -> logits `[B, T, vocab]` (see the module docstring)."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        mixers = validate_model(model_cfg)
        self.vocab_size, self.d_model = model_cfg.vocab_size, model_cfg.d_model
        self.pattern, self.num_layers = model_cfg.pattern, model_cfg.num_layers
        self.layer_letters = tuple(layer_pattern(model_cfg))
        self.ffn_kinds = tuple(ffn_plan(model_cfg))
        self.num_periods = model_cfg.num_layers // len(model_cfg.pattern)
        self.dtype_name, self.remat = model_cfg.dtype, model_cfg.remat
        period = len(model_cfg.pattern)
        first_dense = model_cfg.moe_layers.first_dense_layers if model_cfg.ffn == "moe" else 0
        self.num_lead = min(self.num_periods, -(-first_dense // period))

        self.embed = Embed(model_cfg.vocab_size, model_cfg.d_model, rngs=rngs)
        self.lead_periods = ModuleList([
            Period(model_cfg, mixers, self.ffn_kinds[i * period:(i + 1) * period], rngs=rngs)
            for i in range(self.num_lead)
        ])
        scanned_kinds = self.ffn_kinds[self.num_lead * period:(self.num_lead + 1) * period]

        @nnx.split_rngs(splits=self.num_periods - self.num_lead)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK)
        def stacked_periods(rngs: nnx.Rngs) -> Period:
            return Period(model_cfg, mixers, scanned_kinds, rngs=rngs)

        self.periods = stacked_periods(rngs) if self.num_periods > self.num_lead else None
        self.final_norm = RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps)
        if model_cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(model_cfg.d_model, model_cfg.vocab_size, ("embed", "vocab"), rngs=rngs)

    @property
    def period_blocks(self) -> tuple:
        """One block per distinct layer of the program: the lead periods' blocks, then the scanned
        period's (stacked) blocks."""
        scanned = () if self.periods is None else tuple(self.periods.blocks)
        return tuple(block for period in self.lead_periods for block in period.blocks) + scanned

    def _apply_periods(self, x: jax.Array, documents: dict | None) -> tuple[jax.Array, dict]:
        def run_period(period: Period, h: jax.Array, documents: dict | None) -> tuple[jax.Array, tuple]:
            return period.forward(h, documents)

        if self.remat != "none":
            run_period = nnx.remat(run_period, policy=CHECKPOINT_POLICIES[self.remat])

        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0), transform_metadata=_STACK)
        def scan_periods(h: jax.Array, period: Period, documents: dict | None) -> tuple[jax.Array, tuple]:
            return run_period(period, h, documents)

        lead_stats = []
        for period in self.lead_periods:
            x, stats = run_period(period, x, documents)
            lead_stats.append(stats)
        scanned_stats = ()
        if self.periods is not None:
            x, scanned_stats = scan_periods(x, self.periods, documents)
        return x, {"lead": tuple(lead_stats), "scanned": scanned_stats}

    @staticmethod
    def _check_tokens(tokens: jax.Array, op: str) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"HybridLM{op}: tokens must be an integer array [B, T], got {tokens.dtype}{list(tokens.shape)}"
            )

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens, jnp.dtype(self.dtype_name))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.lm_head is None:
            return self.embed.attend(x)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.forward(tokens, segment_ids=segment_ids, positions=positions)[0]

    def forward(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(logits `[B, T, vocab]`, MoE statistics: {"lead": per lead period, "scanned": per block
        stacked over the scanned periods}; every entry None for a dense block). `segment_ids`,
        `positions` `[B, T]`: packed documents (module docstring)."""
        self._check_tokens(tokens, "")
        documents = packed_documents(tokens.shape, segment_ids, positions, "HybridLM")
        x, moe_stats = self._apply_periods(self._embed(tokens), documents)
        return self._logits(x), moe_stats


    def moe_layer_stats(self, moe_stats: dict) -> list[tuple[int, dict]]:
        """`(layer index, statistics)` of every MoE layer, in depth order, from `forward`'s stats."""
        period, layers = len(self.pattern), []
        for p, period_stats in enumerate(moe_stats["lead"]):
            layers += [(p * period + b, stats) for b, stats in enumerate(period_stats) if stats is not None]
        for b, stats in enumerate(moe_stats["scanned"]):
            if stats is None:
                continue
            for s in range(self.num_periods - self.num_lead):
                layers.append(((self.num_lead + s) * period + b, jax.tree.map(lambda v: v[s], stats)))
        return sorted(layers, key=lambda item: item[0])

    def update_balance_biases(self, moe_stats: dict) -> None:
        """The auxiliary-loss-free bias update of every MoE layer from its load in `moe_stats`."""
        for period, period_stats in zip(self.lead_periods, moe_stats["lead"]):
            for block, stats in zip(period.blocks, period_stats):
                if stats is not None:
                    block.ffn.update_bias(stats["load"])
        if self.periods is not None:  # stacked biases [periods, E] take stacked loads [periods, E]
            for block, stats in zip(self.periods.blocks, moe_stats["scanned"]):
                if stats is not None:
                    block.ffn.update_bias(stats["load"])

    def prefill(
        self, tokens: jax.Array, *, max_len: int | None = None, lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
    ) -> tuple[jax.Array, DecodeCache]:
        """Logits `[B, T, vocab]` for every prompt position and the cache to decode from.

        `max_len`: the most tokens (prompt + generated) any row will hold. It may be left out only
        when no layer's cache is sized by it (`decode_limit` is None: recurrent layers other than
        log-linear, sliding windows W <= T); otherwise leaving it out is a ValueError, as the
        default T would leave no room to decode.
        `lengths` `[B]`: prompt lengths of right-padded rows (default: all T).
        `segment_ids`, `positions` `[B, T]`: a packed prompt (module docstring); the cache holds each
        row's last document, which decoding continues at its last position + 1. Its positions must
        count from 0, as the default ones (the positions within the documents) do. Padding is id 0,
        so `lengths` is not given with them; `positions` alone make each row one document.
        """
        self._check_tokens(tokens, ".prefill")
        batch, t = tokens.shape
        given = max_len is not None
        max_len = max_len if given else t
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < t:
            raise ValueError(f"HybridLM.prefill: max_len must be an int >= the prompt length T={t}, got {max_len!r}")
        lengths = self._checked_lengths(lengths, batch)
        for block in self.period_blocks:
            if not hasattr(block.mixer, "prefill"):
                raise ValueError(f"HybridLM.prefill: mixer {type(block.mixer).__name__} has no decoding path")
        if segment_ids is None and positions is None:
            documents, position = None, jnp.full((batch,), t, jnp.int32) if lengths is None else lengths
        else:
            documents, lengths, position = packed_prompt(tokens.shape, lengths, segment_ids, positions)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0), transform_metadata=_STACK)
        def scan_periods(h: jax.Array, period: Period, lengths: jax.Array | None, documents: dict | None):
            return period.prefill(h, max_len=max_len, lengths=lengths, documents=documents)

        x, lead = self._embed(tokens), []
        for period in self.lead_periods:
            x, period_caches = period.prefill(x, max_len=max_len, lengths=lengths, documents=documents)
            lead.append(period_caches)
        caches = ()
        if self.periods is not None:
            x, caches = scan_periods(x, self.periods, lengths, documents)
        cache = DecodeCache(caches, position, tuple(lead))
        if not given and self.decode_limit(cache) is not None:
            raise ValueError(
                f"HybridLM.prefill: max_len is required for pattern {self.pattern!r}: its global attention "
                f"/ MLA layers (or windows wider than the prompt, or log-linear levels) are sized by "
                f"max_len, and the default (the prompt length T={t}) leaves no room to decode; pass "
                "max_len = T + the number of tokens to generate"
            )
        return self._logits(x), cache

    @staticmethod
    def _checked_lengths(lengths, batch: int) -> jax.Array | None:
        if lengths is None:
            return None
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"HybridLM.prefill: lengths must be an integer array [B] = [{batch}], "
                f"got {lengths.dtype}{list(lengths.shape)}"
            )
        return lengths.astype(jnp.int32)

    def decode_limit(self, cache: DecodeCache) -> int | None:
        """The first position `cache` cannot decode exactly, the smallest `Mixer.decode_limit` of its
        layers (None: no limit). Static: it reads only shapes and the layers' windows, so it works
        under jit."""
        layer_caches = tuple(c for period in cache.lead for c in period) + tuple(cache.layers)
        limits = [block.mixer.decode_limit(layer_cache)
                  for block, layer_cache in zip(self.period_blocks, layer_caches)]
        limits = [limit for limit in limits if limit is not None]
        return min(limits) if limits else None

    def decode_step(self, next_tokens: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """Feeds one token per row (`[B]` or `[B, 1]`) at `cache.position`; logits `[B, vocab]`.

        A row whose position is >= `decode_limit(cache)` (past the capacity of a global attention or
        MLA cache, i.e. the prefill's max_len, or of a log-linear layer's levels) gets NaN logits:
        its cache cannot hold what the layer needs. Outside jit, `hybrid_jax.inference.Decoder`
        raises before such a step.
        """
        tokens = next_tokens[:, None] if next_tokens.ndim == 1 else next_tokens
        if tokens.ndim != 2 or tokens.shape[1] != 1 or tokens.shape[0] != cache.position.shape[0]:
            raise ValueError(
                f"HybridLM.decode_step: next_tokens must be [B] or [B, 1] with B={cache.position.shape[0]} "
                f"(the cache's batch), got shape {tuple(next_tokens.shape)}"
            )
        self._check_tokens(tokens, ".decode_step")
        x = self._embed(tokens)
        position = cache.position

        # The stacked caches ride in the carry and each period updates its slice: XLA then updates
        # them in place, where scanning them as xs -> ys would copy every cache once per token.
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=_STACK)
        def scan_periods(carry, period: Period):
            h, stacked, index = carry
            mine = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, index, keepdims=False), stacked)
            h, mine = period.decode(h, mine, position)
            stacked = jax.tree.map(lambda c, m: jax.lax.dynamic_update_index_in_dim(c, m, index, 0), stacked, mine)
            return h, stacked, index + 1

        lead = []
        for period, period_caches in zip(self.lead_periods, cache.lead):
            x, period_caches = period.decode(x, period_caches, position)
            lead.append(period_caches)
        caches = cache.layers
        if self.periods is not None:
            x, caches, _ = scan_periods((x, cache.layers, jnp.zeros((), jnp.int32)), self.periods)
        logits = self._logits(x)[:, 0]
        limit = self.decode_limit(cache)
        if limit is not None:  # loud, never silently wrong: NaN rows past the cache's capacity
            logits = jnp.where((position >= limit)[:, None], jnp.nan, logits)
        return logits, DecodeCache(caches, position + 1, tuple(lead))


def build_model(model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> HybridLM:
    """Validates `model_cfg` (the `model` section of a config) and builds the model."""
    return HybridLM(model_cfg, rngs=rngs)
