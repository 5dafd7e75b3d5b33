VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test up

# Installs what a fresh machine lacks: redis-server (Debian), a venv with the pinned dependencies.
$(STAMP): pyproject.toml constraints.txt
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The main job on the embedded default: a local profiled stack serving a burst of DiffusionDB prompts.
demo: $(STAMP)
	$(VENV)/bin/diffserve demo

test: $(STAMP)
	$(PY) -m pytest -q

up: $(STAMP)
	$(VENV)/bin/diffserve up
