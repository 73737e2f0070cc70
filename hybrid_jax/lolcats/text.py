"""English text for linearising and evaluating a pretrained model, offline.

`text.source`:

* "python_reference": the prose of the Python Language Reference as it ships with every CPython
  (`pydoc_data.topics`, PSF license): the topics in sorted order, hard-wrapped lines joined into
  paragraphs, headings, grammar rules and indented code blocks dropped. About 0.3 MB of plain
  expository English, far from the Shakespeare corpus the framework trains on by default.
* a path to a UTF-8 .txt file, used as it is.

The last `held_out_fraction` of the tokens are held out: stage 1 and 2 train on windows cut from
the rest, perplexities are measured on the held-out part only.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

_HEADING_RULE = re.compile(r"^[*=\-~^\"]{3,}$")


def python_reference_prose() -> str:
    """The Python Language Reference prose (see the module docstring)."""
    from pydoc_data import topics

    paragraphs = []
    for name in sorted(topics.topics):
        for block in topics.topics[name].split("\n\n"):
            lines = block.split("\n")
            if any(_HEADING_RULE.match(line.strip()) for line in lines):
                continue  # a heading and its underline
            if any(line.startswith((" ", "\t", ">>>")) for line in lines if line):
                continue  # code, grammar, tables and indented lists
            text = " ".join(line.strip() for line in lines).strip()
            if len(text) >= 80 and text[-1] in ".:;)":
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def load_text(source: str) -> str:
    if source == "python_reference":
        return python_reference_prose()
    with open(source, encoding="utf-8") as f:
        return f.read()


@dataclasses.dataclass
class TokenSplits:
    """The corpus tokens, split into the training part and the held-out end."""

    train: np.ndarray  # int32
    held_out: np.ndarray  # int32

    def windows(self, part: str, length: int, count: int) -> np.ndarray:
        """`[count, length]` consecutive non-overlapping windows from the start of `part`."""
        tokens = self.train if part == "train" else self.held_out
        available = len(tokens) // length
        if available < count:
            raise ValueError(f"the {part} text holds {len(tokens)} tokens: {available} windows of {length}, "
                             f"{count} asked for; use a longer text or fewer / shorter sequences")
        return tokens[: count * length].reshape(count, length)


def tokenize_splits(text: str, tokenizer, held_out_fraction: float) -> TokenSplits:
    """Tokenises `text` once and splits its tokens (the last `held_out_fraction` held out)."""
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    cut = int(round(len(tokens) * (1 - held_out_fraction)))
    return TokenSplits(train=tokens[:cut], held_out=tokens[cut:])
