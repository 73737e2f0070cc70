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

.PHONY: test train venv clean

$(STAMP): setup.cfg pyproject.toml
	@py=$$( $(FIND_PYTHON) ) || { echo "error: hybrid_jax needs Python >= 3.12 (JAX >= 0.11 requires it)." \
	  "Install one (e.g. 'pyenv install 3.12') or pass PYTHON=/path/to/python3.12." >&2; exit 1; }; \
	if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then rm -rf $(VENV); fi; \
	[ -x $(PY) ] || { echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q tests

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache .hypothesis
