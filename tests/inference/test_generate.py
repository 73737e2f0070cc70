"""`generate` and `python -m hybrid_jax.generate` on a tiny checkpoint saved by the train package."""
import os

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from hybrid_jax import generate as generate_cli
from hybrid_jax.config import load_config
from hybrid_jax.data import get_tokenizer
from hybrid_jax.inference import Decoder, generate, load_model
from hybrid_jax.train import Checkpointer, axis_rules, build_train_setup, make_mesh
from tests.inference.helpers import compile_fast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "transformer.py") + ":tiny"
STEP = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory as `python -m hybrid_jax.train` leaves it: config.json and an orbax checkpoint
    of a freshly initialised train state, written by the train package's own Checkpointer."""
    config = load_config(CONFIG)
    path = tmp_path_factory.mktemp("run")
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    setup = build_train_setup(config, mesh, axis_rules(config.mesh))
    state = setup.init_state(seed=3)
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpointer = Checkpointer(os.path.join(path, "checkpoints"), keep=1)
    checkpointer.save(STEP, state, data_iter)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
    return str(path), jax.device_get(state.params)


@pytest.fixture(scope="module")
def restored(workdir):
    return load_model(workdir[0])


def test_load_model_restores_the_checkpoint(workdir, restored):
    model, config, step = restored
    assert step == STEP and config.data.tokenizer == "byte"
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    saved = jax.tree_util.tree_leaves_with_path(workdir[1])
    assert len(saved) == len(jax.tree.leaves(params))
    for path, value in saved:
        leaf = params
        for key in path:
            leaf = leaf[key.key]
        np.testing.assert_array_equal(leaf, value, err_msg=jax.tree_util.keystr(path))


def test_greedy_generation_follows_the_forward_argmax(restored):
    """Each greedy token is the argmax of the full forward pass at the position before it, for rows
    of different prompt lengths decoded together."""
    model = restored[0]
    lengths = np.array([5, 2])
    prompts = np.array([[10, 20, 30, 40, 50], [60, 70, 0, 0, 0]])
    new = 6
    tokens = generate(model, prompts, new, temperature=0, lengths=lengths)
    assert tokens.shape == (2, new) and tokens.dtype == np.int32
    sequences = np.zeros((2, 5 + new), np.int32)
    for row, (n, prompt) in enumerate(zip(lengths, prompts)):
        sequences[row, : n + new] = np.concatenate([prompt[:n], tokens[row]])
    graphdef, state = nnx.split(model)
    logits = compile_fast(lambda s, t: nnx.merge(graphdef, s)(t), state, sequences)(state, sequences)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(np.argmax(logits[row, n - 1 : n - 1 + new], axis=-1), tokens[row])


def test_sampled_generation_is_seeded(restored):
    decoder = Decoder(restored[0])  # one split, shared by the calls (nothing recompiles)
    arrived = []
    a = generate(decoder, [1, 2, 3], 8, temperature=1.0, top_k=20, seed=11, on_token=arrived.append)
    b = generate(decoder, [1, 2, 3], 8, temperature=1.0, top_k=20, seed=11)
    c = generate(decoder, [1, 2, 3], 8, temperature=1.0, top_k=20, seed=12)
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    np.testing.assert_array_equal(np.stack(arrived, axis=1), a)
    with pytest.raises(ValueError, match=r"max_len=5 is too small for a 3-token prompt and 8 new tokens"):
        generate(decoder, [1, 2, 3], 8, max_len=5)


def test_cli_prints_the_continuation(workdir, restored, capsys):
    code = generate_cli.main(["--workdir", workdir[0], "--prompt", "ROMEO:", "--max_new_tokens", "12",
                              "--temperature", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    tokenizer = get_tokenizer("byte")
    expected = generate(restored[0], tokenizer.encode("ROMEO:"), 12, temperature=0)[0]
    assert printed == "ROMEO:" + tokenizer.decode(expected.tolist()) + "\n"


def test_cli_errors(workdir, tmp_path, capsys):
    assert generate_cli.main(["--workdir", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert generate_cli.main(["--workdir", workdir[0], "--step", "7"]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err


def test_a_kda_run_saved_before_the_safe_gate_keeps_the_softplus_gate(tmp_path):
    """KDA's gate_lower_bound (default -5) did not exist in older runs, which trained the softplus gate."""
    import json

    from hybrid_jax.inference import load_run_config

    config = load_config(os.path.join(ROOT, "experiments", "configs", "kimi_linear.py") + ":tiny")
    saved = json.loads(config.to_json_best_effort())
    for letter, bound in (("K", None), ("L", -3.0)):  # "L": a config that sets the key keeps it
        saved["model"]["mixers"][letter] = dict(saved["model"]["mixers"]["K"], gate_lower_bound=bound)
    del saved["model"]["mixers"]["K"]["gate_lower_bound"]
    saved["model"]["pattern"] = "KLMM"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    mixers = load_run_config(str(tmp_path)).model.mixers
    assert mixers["K"].gate_lower_bound is None and mixers["L"].gate_lower_bound == -3.0
    assert config.model.mixers["K"].gate_lower_bound == -5.0  # what a new run trains


def test_a_run_saved_before_a_model_key_existed_still_loads(workdir, tmp_path):
    """config.json written before model.moe / model.moe_layers existed: those keys take their defaults."""
    import json
    import shutil

    from hybrid_jax.config import get_default_config
    from hybrid_jax.inference import load_run_config

    old = tmp_path / "old_run"
    shutil.copytree(workdir[0], old)
    saved = json.loads((old / "config.json").read_text())
    added = [key for key in ("moe", "moe_layers") if key in saved["model"]]
    assert added, "the schema keys this test drops must exist"
    for key in added:
        del saved["model"][key]
    (old / "config.json").write_text(json.dumps(saved))
    config = load_run_config(str(old))
    defaults = get_default_config().model
    for key in added:
        assert config.model[key].to_dict() == defaults[key].to_dict()
    model, _, step = load_model(str(old))
    assert step == STEP
