"""`python -m hybrid_jax.inspect`: parameter counts from the model, cache bytes, the hybrid cache saving."""

import pathlib

from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.inspect import inspect_model, main
from hybrid_jax.models import build_model
from hybrid_jax.nn import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRANSFORMER_TINY = str(ROOT / "experiments/configs/transformer.py") + ":tiny"

# A hybrid from registered kinds only: three sliding-window attention layers per NoPE MLA layer.
HYBRID_CONFIG = """
from hybrid_jax.config import mixer, preset_config

def get_config(preset="tiny"):
    config = preset_config(preset)
    config.model.num_layers, config.model.pattern = 8, "SSSM"
    config.model.mixers = {
        "S": mixer("attention", num_heads=4, num_kv_heads=2, window=16),
        "M": mixer("mla", num_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=0, v_head_dim=16),
    }
    return config
"""


def test_transformer_report_matches_model(capsys):
    assert main(["--config", TRANSFORMER_TINY, "--context", "128"]) == 0
    printed = capsys.readouterr().out
    config = load_config(TRANSFORMER_TINY)
    report = inspect_model(config, context=128)
    total = count_params(build_model(config.model, rngs=nnx.Rngs(0)))  # the real, allocated model
    assert report.total_params == total and f"total parameters        {total:,}" in printed
    rows_total = (
        sum(r.mixer_params + r.ffn_params for r in report.layers)
        + report.embedding_params
        + report.head_params
    )
    assert rows_total == total
    # GQA cache: k and v, 2 kv heads of 16 dims, 128 tokens, 2 layers, bf16.
    assert report.total_cache_bytes == 2 * (2 * 2 * 16 * 128 * 2)
    assert [r.kind for r in report.layers] == ["attention", "attention"]
    assert report.reference_kind is None and "KV cache vs" not in printed  # not a hybrid


def test_hybrid_cache_saving_against_all_mla(tmp_path, capsys):
    path = tmp_path / "swa_mla.py"
    path.write_text(HYBRID_CONFIG)
    assert main(["--config", f"{path}:tiny", "--context", "1024"]) == 0
    printed = capsys.readouterr().out
    report = inspect_model(load_config(f"{path}:tiny"), context=1024)
    swa, mla = 2 * 2 * 16 * 16 * 2, 24 * 1024 * 2  # window-bounded KV; latent of 24 per token
    assert [r.cache_bytes for r in report.layers[:4]] == [swa, swa, swa, mla]
    assert report.reference_kind == "mla" and report.reference_cache_bytes == 8 * mla
    expected_saving = 1 - (6 * swa + 2 * mla) / (8 * mla)
    assert abs(report.cache_saving - expected_saving) < 1e-12
    assert "KV cache vs all-mla" in printed and f"{100 * expected_saving:.1f}% saved" in printed


def test_bad_config_is_reported(capsys):
    assert main(["--config", "no/such/config.py:tiny"]) == 2
    assert "error: config file 'no/such/config.py' not found" in capsys.readouterr().err


def test_moe_report_counts_active_parameters_and_routed_flops():
    config = load_config(str(ROOT / "experiments/configs/kimi_linear_moe.py") + ":tiny")
    report = inspect_model(config, context=64)
    moe, d = config.model.moe, config.model.d_model
    expert = 3 * d * moe.mlp_dim
    assert [r.ffn_kind for r in report.layers] == ["swiglu", "moe", "moe", "moe"]  # first layer dense
    total = count_params(nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0))))
    assert report.total_params == total
    idle = (moe.num_experts - moe.experts_per_token) * expert  # routed experts a token does not run
    assert report.active_params == total - 3 * idle
    dense, routed = report.layers[0], report.layers[1]
    assert routed.ffn_params - routed.active_ffn_params == idle
    # k + shared experts of width mlp_dim / 3 and the router: the dense FFN's FLOPs plus 2 d E.
    assert routed.flops_per_token - dense.flops_per_token == 2 * d * moe.num_experts
