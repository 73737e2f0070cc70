"""Corpus sources: the Shakespeare markdown stripper, text folders and files, .npy, ArrayRecord."""
import re

import numpy as np
import pytest

from hybrid_jax import data
from hybrid_jax.data.shakespeare import play_markdown_to_text, shakespeare_documents

MARKDOWN = """# A Play

## ACT I

### SCENE I. A heath.

_Enter FIRST WITCH and SECOND
WITCH_

**FIRST WITCH**  
When shall we meet again,  
In thunder\\--lightning?

**SECOND WITCH**  
_\\[Aside]_  
When the hurlyburly's done.

*Exit.*

Then the battle's won.

SECOND

**OF WITCHES**  
[To FIRST WITCH]_  
Anon.

### SCENE II. A camp.

A line with no speaker.
"""


def test_markdown_rules():
    assert play_markdown_to_text(MARKDOWN) == (
        "FIRST WITCH:\nWhen shall we meet again,\nIn thunder--lightning?\n\n"
        "SECOND WITCH:\nWhen the hurlyburly's done.\n\n"
        "SECOND WITCH:\nThen the battle's won.\n\n"  # resumed after a stage direction
        "SECOND OF WITCHES:\nAnon.\n\n"  # a speaker name split by a paragraph break
        "A line with no speaker.\n"  # a heading clears the speaker
    )


@pytest.fixture(scope="module")
def plays():
    return shakespeare_documents()


def test_shakespeare_is_plain_name_colon_text(plays):
    assert len(plays) == 38
    text = "\n".join(plays)
    assert not set("#*_\\[]`<>") & set(text)
    speeches = [p for play in plays for p in play.strip("\n").split("\n\n")]
    named = [p for p in speeches if re.match(r"[A-Za-z][A-Za-z '&.,-]*:\n\S", p)]
    assert len(named) > 0.999 * len(speeches) > 30_000
    assert "HAMLET:\nWords, words, words.\n" in text
    assert "BISHOP OF WINCHESTER:\nHe was a king bless'd of the King of kings.\n" in text


def test_missing_path_is_named_before_any_work(monkeypatch):
    def fail(*args):
        raise AssertionError("tokenised before checking the path")

    monkeypatch.setattr(data.pipeline, "tokenize_corpus", fail)
    with pytest.raises(FileNotFoundError, match="/no/such/corpus_dir"):
        data.make_datasets({"source": "/no/such/corpus_dir"}, seq_len=8, batch_size=2, seed=0)


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no .txt files"):
        data.resolve_source(str(tmp_path / "empty"))
    (tmp_path / "corpus.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"unsupported file type '.csv'.*\.npy"):
        data.resolve_source(str(tmp_path / "corpus.csv"))
    with pytest.raises(ValueError, match="unknown data config key.*'sorce'.*'source'"):
        data.make_datasets({"sorce": "x"}, seq_len=8, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        data.make_datasets({"val_fraction": 1.0}, seq_len=8, batch_size=2, seed=0)


def test_folder_of_txt(tmp_path):
    (tmp_path / "sub").mkdir()
    docs = {"b.txt": "second document, über\n" * 40, "sub/a.txt": "first one\n" * 60}
    for name, text in docs.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored")
    train_iter, val_batches, tok, stats = data.make_datasets(
        {"source": str(tmp_path), "val_fraction": 0.1}, seq_len=16, batch_size=2, seed=0,
        shard_index=0, shard_count=1)
    expected = (docs["b.txt"] + docs["sub/a.txt"]).encode()  # sorted paths; byte: no eos
    assert stats.num_documents == 2 and stats.total_tokens == len(expected)
    assert stats.bytes_per_token == 1.0
    batch = next(train_iter)
    for row in batch["inputs"]:
        assert bytes(row.astype(np.uint8)) in expected
    assert bytes(next(val_batches())["inputs"][0].astype(np.uint8)) in expected[-stats.val_tokens:]


def test_single_txt_with_gpt2_appends_eos(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Hello world. " * 200)
    corpus = data.tokenize_corpus(data.resolve_source(str(path)), data.get_tokenizer("gpt2"))
    assert corpus.num_documents == 1 and corpus.tokens[-1] == 50256
    assert corpus.tokens[:2].tolist() == [15496, 995]


def test_npy_source_checks_ids(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(300, dtype=np.int64))
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary \[0, 256\)"):
        data.make_datasets({"source": str(tmp_path / "ids.npy")}, seq_len=8, batch_size=2,
                           seed=0, shard_index=0, shard_count=1)
    np.save(tmp_path / "ids2d.npy", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="1-D integer array"):
        data.tokenize_corpus(data.resolve_source(str(tmp_path / "ids2d.npy")),
                             data.get_tokenizer("byte"))


def test_array_record_source(tmp_path):
    pytest.importorskip("array_record")
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = ["première ligne\n" * 30, "second record\n" * 30]
    writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
    for doc in docs:
        writer.write(doc.encode("utf-8"))
    writer.close()
    corpus = data.tokenize_corpus(data.resolve_source(str(tmp_path / "docs.array_record")),
                                  data.get_tokenizer("byte"))
    assert corpus.num_documents == 2
    assert bytes(corpus.tokens.astype(np.uint8)).decode() == "".join(docs)
