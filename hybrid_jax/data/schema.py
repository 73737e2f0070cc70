"""The `data` section of a training config: its defaults and its checks (read by `hybrid_jax.config`).

    data.source        "shakespeare", a folder of .txt, a .txt, .npy or .array_record file, or a
                       synthetic task: "mqar", "selective_copy" (`hybrid_jax.data.tasks`)
    data.tokenizer     "byte", "gpt2" or a SentencePiece ".model" path (text sources only)
    data.val_fraction  text sources: the last val_fraction of the tokens are held out
    data.packing       "documents" (rows of whole documents kept apart by segment ids, the default)
                       or "stream" (windows across document boundaries); `hybrid_jax.data.packing`
    data.val_rows      synthetic tasks: the size of the held-out set (rows)
    data.mqar          {num_kv_pairs, power_a}: the MQAR task (vocabulary: model.vocab_size)
    data.selective_copy {num_tokens}: the selective-copying task
    data.worker_count  grain worker processes (0: the pipeline reads in the training process)

The synthetic tasks are checked against the run's shapes here (train.seq_len, model.vocab_size,
train.batch_size), so that a bad task config fails in `validate`, before anything compiles.
"""

from __future__ import annotations

from hybrid_jax.checks import check_choice, check_number, fail, is_int
from hybrid_jax.data.packing import PACKINGS
from hybrid_jax.data.tasks import DEFAULT_VAL_ROWS, TASKS, check_task, default_task_configs

TOKENIZERS = ("byte", "gpt2")  # or the path of a SentencePiece ".model" file


def default_data_section() -> dict:
    """The defaults of the `data` section of `hybrid_jax.config.get_default_config()`."""
    return {
        "source": "shakespeare",  # or a folder of .txt, a .txt, .npy or .array_record file, or a task
        "tokenizer": "gpt2",
        "val_fraction": 0.05,  # the last val_fraction of the tokens are held out
        "packing": "documents",  # or "stream" (hybrid_jax.data.packing)
        "worker_count": 0,
        "val_rows": DEFAULT_VAL_ROWS,  # synthetic tasks: held-out rows
        **default_task_configs(),
    }


def validate_data_section(data_cfg, *, seq_len: int, vocab_size: int, batch_size: int) -> None:
    """Checks the `data` section (keys already known to match the schema); raises "data.<key>: ..."."""
    tokenizer = data_cfg.tokenizer
    if tokenizer not in TOKENIZERS and not str(tokenizer).endswith(".model"):
        fail("data.tokenizer",
             f"{tokenizer!r} is not valid; valid values are {list(TOKENIZERS)} or a SentencePiece .model path")
    check_number(data_cfg, "val_fraction", low=0, high=1, low_inclusive=False, high_inclusive=False, prefix="data")
    check_choice(data_cfg, "packing", PACKINGS, prefix="data")
    if not is_int(data_cfg.worker_count) or data_cfg.worker_count != 0:
        # grain workers would each copy the in-memory token array the LM pipeline slices.
        fail("data.worker_count", "the LM pipeline slices an in-memory token array in the training "
             f"process; only 0 is supported, got {data_cfg.worker_count!r}")
    if data_cfg.source in TASKS:
        check_task(data_cfg, seq_len=seq_len, vocab_size=vocab_size, batch_size=batch_size)


__all__ = ["TOKENIZERS", "default_data_section", "validate_data_section"]
