# Joule Planner: `make run` starts the app, `make test` runs the whole suite.
# Both build what they need first: the virtual environment with the pinned
# requirements, and the locally generated demo models.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q
PORT   ?= 8501

RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP    := $(VENV)/.test-installed

.PHONY: run test demo-models venv screenshots clean-venv

run: $(RUNTIME_STAMP)
	$(PY) -m engine demo-models
	$(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true

test: $(TEST_STAMP) demo-models
	$(PY) -m pytest

venv: $(RUNTIME_STAMP)

# Generate (once; later calls check and return) the demo models under data/models/.
demo-models: $(RUNTIME_STAMP)
	$(PY) -m engine demo-models --no-register

$(RUNTIME_STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing the pinned requirements (llama-cpp-python compiles from source the first time: ~6 minutes on 2 cores)."
	$(PIP) -r requirements.txt -c constraints.txt
	touch $@

$(TEST_STAMP): $(RUNTIME_STAMP) requirements-test.txt
	$(PIP) -r requirements-test.txt -c constraints.txt
	touch $@

screenshots: $(TEST_STAMP) demo-models
	SCREENSHOTS=1 $(PY) -m pytest tests/test_browser.py -q

clean-venv:
	rm -rf $(VENV)
