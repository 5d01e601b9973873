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

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
