"""Linearising a pretrained transformer with LoLCATs (Zhang et al. 2024), and choosing which layers keep softmax.

    transfer   stage 1, attention transfer: per layer, Hedgehog feature maps learn to reproduce
               softmax attention (MSE); `python -m hybrid_jax.lolcats.transfer`
    finetune   stage 2: LoRA adapters on q, k, v, o train on the next-token loss;
               `python -m hybrid_jax.lolcats.finetune`
    selection  rank layers by transfer error: the N worst stay softmax attention (vs N evenly spaced)
    report     the whole pipeline on SmolLM2-135M with held-out perplexities, decode memory, a table
               and a plot; `python -m hybrid_jax.lolcats.report`
    swap       mixer configs and parameter grafting between attention, LoLCATs and hybrids
    text       the offline English corpus; `config` the schema; `training` what the stages share

Pretrained weights come from `hybrid_jax.convert`; the layer is `hybrid_jax.nn.lolcats`.
"""
