"""A tiny random Llama (tests/convert/llama_files) as a GGUF file, a short English text, and a LoLCATs
config sized for them: window 16 over 48-token sequences, so both the window softmax and the
linear part carry tokens."""

import pytest

from hybrid_jax.lolcats.config import get_default_config, validate
from tests.convert import llama_files

PASSAGE = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a can of oil and a "
    "box of matches. From the top of the tower he could see the fishing boats returning to the harbour, "
    "their sails turning gold in the last light of the day. He had kept the lamp burning for thirty "
    "years, through storms that shook the windows and winters so cold that the sea froze along the "
    "shore. The villagers said that no ship had ever been lost on the rocks while he was on watch. "
)


@pytest.fixture(scope="package")
def tiny_setup(tmp_path_factory):
    """(config, folder): the tiny model's GGUF, a text file and a workdir under one temporary folder."""
    folder = tmp_path_factory.mktemp("lolcats")
    gguf_path = str(folder / "tiny.gguf")
    llama_files.write_gguf(gguf_path, llama_files.random_weights(0, bias=False, tied=True))
    text_path = folder / "passage.txt"
    text_path.write_text(PASSAGE * 8)
    config = get_default_config()
    config.source, config.workdir = gguf_path, str(folder / "run")
    config.text.source, config.text.eval_seq_len, config.text.eval_sequences = str(text_path), 48, 2
    config.lolcats.window, config.lolcats.chunk_size = 16, 16
    config.transfer.update(seq_len=48, batch_size=2, train_sequences=4, eval_sequences=2, steps=12,
                           warmup_steps=1, log_every=4)
    config.finetune.update(seq_len=48, batch_size=2, steps=10, warmup_steps=1, log_every=5, checkpoint_every=5,
                           learning_rate=1e-2)
    return validate(config), folder


@pytest.fixture(scope="package")
def stage1(tiny_setup):
    from hybrid_jax.lolcats.transfer import run_transfer

    return run_transfer(tiny_setup[0])
