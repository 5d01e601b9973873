# The two commands a new user needs (README): `make quickstart` and `make test`.
# Each creates .venv and installs everything on a fresh machine; later runs reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test test-fast clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/setup.sh
	bash .ci/setup.sh $(VENV)
	touch $@

quickstart: setup
	$(PY) -m align train recipes/quickstart.yaml

# Two pytest-xdist workers, whole files each (module fixtures such as a served vLLM start once);
# tests/conftest.py gives each worker its share of the cores.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
