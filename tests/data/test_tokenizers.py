"""Tokenizers: exact round trips, the published GPT-2 ids, byte counts, and clear errors."""
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybrid_jax.data import tokenizers
from hybrid_jax.data.tokenizers import get_tokenizer

SAMPLE = "To be, or not to be.\n\n  naïve 東京 🙂\t<|endoftext|> x's 1234"


@given(st.text())
def test_byte_round_trip(text):
    tok = get_tokenizer("byte")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_byte_properties_and_bad_ids():
    tok = get_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id) == (256, None)
    np.testing.assert_array_equal(tok.token_byte_lengths(), np.ones(256))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([72, 256])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), np.int32))


def test_gpt2_known_ids_and_round_trip():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    # Special-token text in a corpus is text, never the eos id.
    assert tok.eos_id not in ids
    assert tok.encode_array(SAMPLE).dtype == np.int32


def test_gpt2_byte_lengths_count_utf8_bytes():
    tok = get_tokenizer("gpt2")
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (50257,) and lengths[tok.eos_id] == 0
    assert lengths[tok.encode(SAMPLE)].sum() == len(SAMPLE.encode("utf-8"))


def test_gpt2_byte_map_is_a_bijection():
    mapping = tokenizers._gpt2_byte_to_char()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "\u0120"  # GPT-2's "Ġ"


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'.*byte.*gpt2.*model"):
        get_tokenizer("bpe")


def test_tokenizer_instance_passes_through():
    tok = get_tokenizer("byte")
    assert get_tokenizer(tok) is tok


def test_sentencepiece_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.model"):
        get_tokenizer(str(tmp_path / "absent.model"))


def test_sentencepiece_missing_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    model = tmp_path / "tok.model"
    model.write_bytes(b"not read: the import fails first")
    with pytest.raises(ModuleNotFoundError, match="pip install sentencepiece"):
        get_tokenizer(str(model))


def test_sentencepiece_round_trip(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat sat on mat number {i} today" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=300, byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    tok = get_tokenizer(str(tmp_path / "tok.model"))
    assert 256 < tok.vocab_size <= 300 and tok.eos_id is not None
    text = "the cat sat on mat number 7 today, naïve 🙂"  # unseen characters use byte pieces
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # The leading "▁" of the first piece stands for a space the text does not have.
    assert tok.token_byte_lengths()[ids].sum() == len(text.encode("utf-8")) + 1
