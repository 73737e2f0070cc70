"""Tokenizers of pretrained checkpoints, run by the `tokenizers` package: the byte-level BPE stored in a
GGUF file's metadata, and a Hugging Face folder's `tokenizer.json`.

GGUF keeps a "gpt2"-model tokenizer as `tokenizer.ggml.tokens` (the vocabulary, each token written
in GPT-2's printable byte alphabet: one character per byte), `tokenizer.ggml.merges` ("a b" pairs in
merge order), `tokenizer.ggml.token_type` (1 normal, 3 control, ...), the eos id and
`tokenizer.ggml.pre`, the name of the pre-tokenizer (the regex that splits text before BPE):

    "gpt2" / "default"  GPT-2's regex (byte-level)
    "smollm"            every digit its own piece, then GPT-2's regex (SmolLM / SmolLM2)

Control tokens (`<|im_start|>`, ...) are kept as vocabulary entries but, as for every tokenizer of
`hybrid_jax.data.tokenizers`, their text inside a string is encoded as ordinary text.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from hybrid_jax.data.tokenizers import Tokenizer, _as_id_array

SUPPORTED_TOKENIZER_MODELS = ("gpt2",)
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "smollm")
_CONTROL = 3


class BPETokenizer(Tokenizer):
    """A `tokenizers` tokenizer behind the `hybrid_jax.data.tokenizers.Tokenizer` interface."""

    def __init__(self, tokenizer, *, name: str, eos_id: int | None, byte_lengths: np.ndarray):
        self._tokenizer, self.name, self.eos_id = tokenizer, name, eos_id
        self.vocab_size = len(byte_lengths)
        self._lengths = np.asarray(byte_lengths, np.int64)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(_as_id_array(ids, self.vocab_size).tolist(), skip_special_tokens=False)

    def _byte_lengths(self) -> np.ndarray:
        return self._lengths


def gguf_bpe(tokens: list[str], merges: list[str], token_types: list[int], *, pre: str, eos_id: int | None,
             name: str) -> BPETokenizer:
    """The byte-level BPE tokenizer of GGUF metadata (see the module docstring)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(f"{name}: GGUF pre-tokenizer {pre!r} is not supported; supported are "
                         f"{list(SUPPORTED_PRE_TOKENIZERS)}")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = HFTokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=pairs))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(split)
    tokenizer.decoder = decoders.ByteLevel()
    # one printable character per byte; control tokens stand for no text
    lengths = [0 if kind == _CONTROL else len(token) for token, kind in zip(tokens, token_types)]
    return BPETokenizer(tokenizer, name=name, eos_id=eos_id, byte_lengths=np.array(lengths))


def tokenizer_from_json(path: str, *, eos_id: int | None = None) -> BPETokenizer:
    """A Hugging Face `tokenizer.json` (any model `tokenizers` runs); special tokens count no bytes."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_file(path)
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    lengths = np.array([0 if tokenizer.id_to_token(i) in special else len(tokenizer.decode([i]).encode("utf-8"))
                        for i in range(size)])
    return BPETokenizer(tokenizer, name=f"hf:{path}", eos_id=eos_id, byte_lengths=lengths)


def tokenizer_from_gguf_fields(fields, source: str) -> BPETokenizer | None:
    """The tokenizer of a GGUF file's metadata `fields`; None when the file carries none."""
    if "tokenizer.ggml.model" not in fields:
        return None
    model = fields["tokenizer.ggml.model"].contents()
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(f"{source}: GGUF tokenizer model {model!r} is not supported; supported are "
                         f"{list(SUPPORTED_TOKENIZER_MODELS)}")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    types = (fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields
             else [1] * len(tokens))
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
    eos = int(fields["tokenizer.ggml.eos_token_id"].contents()) if "tokenizer.ggml.eos_token_id" in fields else None
    return gguf_bpe(tokens, merges, types, pre=pre, eos_id=eos, name=f"gguf:{source}")
