"""A tiny random Llama, written to GGUF (llama.cpp layout: permuted q/k rows, one Q8_0 and one Q4_1
tensor) and to a Hugging Face folder (config.json + safetensors), plus an independent numpy forward."""
from __future__ import annotations

import json
import os

import numpy as np

TINY = dict(vocab=260, d=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96, theta=500.0, eps=1e-5)


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for every byte, in byte order (written out here, not imported)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


MERGES = ["t h", "th e", "\u0120 the"]  # "Ġ" (U+0120) is the byte-level space
TOKENS = byte_alphabet() + ["th", "the", "\u0120the", "<|end|>"]
TOKEN_TYPES = [1] * 259 + [3]


def random_weights(seed: int, *, bias: bool, tied: bool) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of the tiny Llama."""
    rng = np.random.default_rng(seed)
    t = TINY
    q_dim, kv_dim = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm():
        return (1.0 + 0.2 * rng.standard_normal(t["d"])).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((t["vocab"], t["d"])).astype(np.float32),
         "model.norm.weight": norm()}
    if not tied:
        w["lm_head.weight"] = mat(t["vocab"], t["d"])
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = norm(), norm()
        for name, rows, cols in (("q", q_dim, t["d"]), ("k", kv_dim, t["d"]), ("v", kv_dim, t["d"]),
                                 ("o", t["d"], q_dim)):
            w[p + f"self_attn.{name}_proj.weight"] = mat(rows, cols)
            if bias:
                w[p + f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(rows)).astype(np.float32)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = mat(t["mlp"], t["d"]), mat(t["mlp"], t["d"])
        w[p + "mlp.down_proj.weight"] = mat(t["d"], t["mlp"])
    return w


def write_hf(folder: str, weights: dict, *, bias: bool, tied: bool) -> None:
    from safetensors.numpy import save_file

    t = TINY
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": t["vocab"],
              "hidden_size": t["d"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
              "num_key_value_heads": t["kv_heads"], "head_dim": t["head_dim"], "intermediate_size": t["mlp"],
              "rope_theta": t["theta"], "rms_norm_eps": t["eps"], "tie_word_embeddings": tied,
              "attention_bias": bias, "hidden_act": "silu", "rope_scaling": None}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(weights)
    half = len(names) // 2  # two shards, as large checkpoints come
    save_file({n: weights[n] for n in names[:half]}, os.path.join(folder, "model-00001-of-00002.safetensors"))
    save_file({n: weights[n] for n in names[half:]}, os.path.join(folder, "model-00002-of-00002.safetensors"))
    write_tokenizer_json(os.path.join(folder, "tokenizer.json"))


def write_tokenizer_json(path: str) -> None:
    """The tiny byte-level BPE (TOKENS, MERGES; the last token special) as a Hugging Face tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(TOKENS[:-1])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(TOKENS[-1], special=True)])
    tokenizer.save(path)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rows (what its converter writes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}
QUANTISED = {"blk.0.ffn_down.weight": "Q8_0", "blk.1.ffn_up.weight": "Q4_1"}


def write_gguf(path: str, weights: dict, *, arch: str = "llama", embed_type: str | None = None) -> dict:
    """Writes `weights` (tied, no bias) as GGUF; returns the HF-named weights as the file stores them
    (the quantised tensors dequantised back), which is what a faithful reader must recover."""
    import gguf

    t = TINY
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(t["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(t["d"])
    writer.add_feed_forward_length(t["mlp"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_freq_base(t["theta"])
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_layer_norm_rms_eps(t["eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_eos_token_id(len(TOKENS) - 1)
    stored = dict(weights)
    embed = weights["model.embed_tokens.weight"]
    if embed_type == "I32":
        writer.add_tensor("token_embd.weight", np.zeros(embed.shape, np.int32))
    else:
        writer.add_tensor("token_embd.weight", embed)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for i in range(t["layers"]):
        for hf_name, gguf_name in _GGUF_NAMES.items():
            w = weights[f"model.layers.{i}.{hf_name}"]
            name = f"blk.{i}.{gguf_name}"
            if name.endswith("attn_q.weight"):
                w = llama_cpp_permute(w, t["heads"])
            elif name.endswith("attn_k.weight"):
                w = llama_cpp_permute(w, t["kv_heads"])
            if name in QUANTISED:
                kind = gguf.GGMLQuantizationType[QUANTISED[name]]
                packed = gguf.quants.quantize(w, kind)
                writer.add_tensor(name, packed, raw_dtype=kind)
                stored[f"model.layers.{i}.{hf_name}"] = gguf.quants.dequantize(packed, kind).reshape(w.shape)
            else:
                writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):
    """Rotate-half RoPE on x [T, H, D] at positions 0..T-1 (float64)."""
    t, _, d = x.shape
    freq = theta ** (-np.arange(0, d, 2) / d)
    angle = np.arange(t)[:, None] * freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def numpy_forward(weights: dict, ids: np.ndarray) -> np.ndarray:
    """Logits [T, vocab] of the HF-named tiny Llama on one sequence, in float64."""
    t = TINY
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    h, dh, groups = t["heads"], t["head_dim"], t["heads"] // t["kv_heads"]
    x = w["model.embed_tokens.weight"][ids]
    n = len(ids)
    causal = np.tril(np.ones((n, n), bool))
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"], t["eps"])
        proj = {}
        for name in "qkv":
            out = y @ w[p + f"self_attn.{name}_proj.weight"].T + w.get(p + f"self_attn.{name}_proj.bias", 0.0)
            proj[name] = out.reshape(n, -1, dh)
        q, k = _rope(proj["q"], t["theta"]), _rope(proj["k"], t["theta"])
        k, v = np.repeat(k, groups, axis=1), np.repeat(proj["v"], groups, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(dh)
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", probs, v).reshape(n, h * dh)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T + w.get(p + "self_attn.o_proj.bias", 0.0)
        y = _rms(x, w[p + "post_attention_layernorm.weight"], t["eps"])
        gate, up = y @ w[p + "mlp.gate_proj.weight"].T, y @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], t["eps"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T
