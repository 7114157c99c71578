# Two commands on a fresh machine: `make demo` and `make test`. Each creates its venv and installs first:
# `make demo` .venv (torch's CPU build, 2.1 GB), `make test` .venv-cuda (torch's CUDA build, 5.8 GB).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The test venv holds torch's CUDA build, the registry's default wheel and so what `pip install torch` gives a
# user: the whole suite runs on it (no GPU needed: torch.cuda.is_available() is False), and tests/fake_cuda
# runs the CUDA code paths on emulated CUDA tensors (docs/fake_cuda.md).
TEST_VENV  ?= .venv-cuda
TEST_PY    := $(TEST_VENV)/bin/python
TEST_STAMP := $(TEST_VENV)/.installed

.PHONY: demo test test-fast test-fake-cuda test-browser test-gpu install install-test browser clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU build, never the CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(TEST_STAMP): requirements.txt pyproject.toml constraints-cuda.txt
	test -x $(TEST_PY) || $(PYTHON) -m venv $(TEST_VENV)
	$(TEST_PY) -m pip install -q --upgrade pip
	# torch first: `===` (the exact version string) takes the registry's CUDA build, never the local +cpu wheel
	$(TEST_PY) -m pip install -q "torch===2.13.0"
	$(TEST_PY) -m pip install -q -r requirements.txt -c constraints-cuda.txt
	$(TEST_PY) -m pip install -q --no-deps -e .
	$(TEST_PY) -c "import sys, torch; sys.exit(None if torch.version.cuda else 'make: $(TEST_VENV) has torch ' + torch.__version__ + ', not the CUDA build')"
	touch $(TEST_STAMP)

install-test: $(TEST_STAMP)

# Debian's Chromium for the UI browser test (no browser download from the web).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lite_srpo demo

# pytest exit 5 ("no tests ran") is turned into a failure on purpose: an empty run proves nothing. So is a run
# where the fake_cuda tests were skipped or not collected (LITE_SRPO_REQUIRE_FAKE_CUDA, tests/conftest.py).
# PYTEST_ARGS: e.g. a path, to run part of the suite the way CI runs it.
test: $(TEST_STAMP) browser
	@HF_HUB_OFFLINE=1 LITE_SRPO_REQUIRE_FAKE_CUDA=1 $(TEST_PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fake-cuda: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 LITE_SRPO_REQUIRE_FAKE_CUDA=1 $(TEST_PY) -m pytest -q -p no:cacheprovider -m fake_cuda

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not browser"

test-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu -o addopts=""

clean:
	rm -rf runs tiny_models .pytest_cache
