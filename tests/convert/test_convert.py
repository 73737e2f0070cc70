"""Checkpoint conversion: GGUF and HF safetensors files of a tiny random Llama (written here) load
into a HybridLM whose logits equal an independent numpy forward; bad files give clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.convert import read_gguf, read_hf, to_hybrid
from tests.convert import llama_files
from tests.convert.llama_files import TINY

IDS = np.array([3, 17, 259, 42, 100, 7, 255, 258, 64, 1, 9, 200], np.int64)


def _logits(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(ids)[None])[0])


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    weights = llama_files.random_weights(0, bias=False, tied=True)
    return path, llama_files.write_gguf(path, weights)


def test_gguf_logits_equal_numpy_forward(gguf_file):
    path, stored = gguf_file
    checkpoint = read_gguf(path)
    spec = checkpoint.spec
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.mlp_dim) == (2, 4, 2, 16, 96)
    assert spec.tie_embeddings and spec.rope_theta == TINY["theta"] and spec.norm_eps == pytest.approx(TINY["eps"])
    model, cfg = to_hybrid(checkpoint)
    assert cfg.mixers["A"].rope_theta == TINY["theta"] and model.lm_head is None
    np.testing.assert_allclose(_logits(model, IDS), llama_files.numpy_forward(stored, IDS), rtol=1e-4, atol=1e-4)


def test_hf_logits_equal_numpy_forward(tmp_path):
    weights = llama_files.random_weights(1, bias=True, tied=False)
    llama_files.write_hf(str(tmp_path), weights, bias=True, tied=False)
    checkpoint = read_hf(str(tmp_path))
    assert checkpoint.spec.qkv_bias and checkpoint.spec.o_bias and not checkpoint.spec.tie_embeddings
    tokenizer = checkpoint.tokenizer  # from the folder's tokenizer.json
    assert tokenizer.vocab_size == TINY["vocab"] and tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    assert tokenizer.encode(" the") == [llama_files.TOKENS.index("\u0120the")]
    assert tokenizer.token_byte_lengths()[-1] == 0 and tokenizer.token_byte_lengths()[257] == 3  # "the"
    model, _ = to_hybrid(checkpoint)
    np.testing.assert_allclose(_logits(model, IDS), llama_files.numpy_forward(weights, IDS), rtol=1e-4, atol=1e-4)


def test_gguf_tokenizer_from_metadata(gguf_file):
    tokenizer = read_gguf(gguf_file[0]).tokenizer
    assert tokenizer.vocab_size == TINY["vocab"] and tokenizer.eos_id == TINY["vocab"] - 1
    ids = tokenizer.encode("the cat, the end")
    # "the" merges to one token; " the" (space included) to another; other bytes stay single
    assert ids[0] == llama_files.TOKENS.index("the") and llama_files.TOKENS.index("\u0120the") in ids
    assert tokenizer.decode(ids) == "the cat, the end"
    assert tokenizer.decode(tokenizer.encode("naïve ☃")) == "naïve ☃"
    assert tokenizer.token_byte_lengths()[llama_files.TOKENS.index("\u0120the")] == 4
    assert tokenizer.token_byte_lengths()[-1] == 0  # the control token stands for no text


def test_unsupported_architecture_is_named(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    llama_files.write_gguf(path, llama_files.random_weights(0, bias=False, tied=True), arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported.*\['llama'\]"):
        read_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = str(tmp_path / "int.gguf")
    llama_files.write_gguf(path, llama_files.random_weights(0, bias=False, tied=True), embed_type="I32")
    with pytest.raises(ValueError, match=r"token_embd.weight has GGUF type I32.*supported types are .*'Q4_1'"):
        read_gguf(path)


def test_hf_errors_name_the_problem(tmp_path):
    weights = llama_files.random_weights(0, bias=False, tied=True)
    llama_files.write_hf(str(tmp_path), weights, bias=False, tied=True)
    config_path = tmp_path / "config.json"
    config = config_path.read_text()
    config_path.write_text(config.replace('"model_type": "llama"', '"model_type": "gpt_neox"'))
    with pytest.raises(ValueError, match=r"model_type 'gpt_neox' is not supported.*\['llama'\]"):
        read_hf(str(tmp_path))
    config_path.write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ValueError, match=r"layer 2 attn_norm is missing"):
        read_hf(str(tmp_path))
