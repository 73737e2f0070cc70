"""Data: corpus sources, tokenizers, the grain LM pipeline, and synthetic tasks.

    from hybrid_jax import data
    train_iter, val_batches, tokenizer, stats = data.make_datasets(
        data.default_data_config(), seq_len=256, batch_size=32, seed=0)
    batch = next(train_iter)            # {"inputs", "targets", "segment_ids", "positions": int32 [32, 256],
                                        #  "loss_mask": float32 [32, 256]}: packed documents
                                        # (hybrid_jax.data.packing; data.packing = "stream": inputs, targets)
    state = train_iter.get_state()      # save with the checkpoint; train_iter.set_state(state)
    for batch in val_batches(): ...     # one finite pass over this process's validation shard
    stats.bits_per_byte(loss_nats)      # compare with stats.unigram_bits_per_byte

    # Synthetic recall tasks (hybrid_jax.data.tasks): rows made on the fly, batches with "loss_mask"
    config = data.default_data_config(); config.source = "mqar"; config.mqar.num_kv_pairs = 4
    train_iter, val_batches, _, stats = data.make_datasets(config, seq_len=64, batch_size=32, seed=0,
                                                           vocab_size=128)
"""

from hybrid_jax.data.pipeline import (
    Batch,
    DataStats,
    Datasets,
    PackedSequences,
    TokenizedCorpus,
    default_data_config,
    eval_dataset,
    make_datasets,
    split_tokens,
    tokenize_corpus,
    train_dataset,
    unigram_bits_per_token,
    windows_to_batch,
)
from hybrid_jax.data.shakespeare import play_markdown_to_text, shakespeare_documents
from hybrid_jax.data.sources import Source, resolve_source
from hybrid_jax.data.synthetic import mqar_batch, selective_copy_batch
from hybrid_jax.data.tasks import TASKS, TaskStats
from hybrid_jax.data.tokenizers import (
    ByteTokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    get_tokenizer,
)

__all__ = [
    "Batch", "ByteTokenizer", "DataStats", "Datasets", "GPT2Tokenizer", "PackedSequences",
    "SentencePieceTokenizer", "Source", "TokenizedCorpus", "Tokenizer", "default_data_config",
    "eval_dataset", "get_tokenizer", "make_datasets", "mqar_batch", "play_markdown_to_text",
    "resolve_source", "selective_copy_batch", "shakespeare_documents", "TASKS", "TaskStats", "split_tokens", "tokenize_corpus",
    "train_dataset", "unigram_bits_per_token", "windows_to_batch",
]
