# StreetVision. `make run` and `make test` set up their own virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/local
ARGS   ?=
REGISTRY ?= ghcr.io/streetvision
TAG      ?= 0.1.0

.PHONY: venv test test-fast lint bench run compile submit clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt -e '.[train,pipelines,dev]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not slow and not docker" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check streetvision components pipelines tests bench
	$(BIN)/ruff format --check streetvision components pipelines tests bench

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH)

run: $(STAMP)
	$(BIN)/streetvision run --out $(OUT) $(ARGS)

# Regenerate pipelines/streetvision.yaml and components/*.yaml (REGISTRY / TAG override the images).
compile: $(STAMP)
	STREETVISION_REGISTRY=$(REGISTRY) STREETVISION_TAG=$(TAG) $(BIN)/python -m pipelines.compile $(COMPILE_ARGS)

# Upload the compiled pipeline and start a run: make submit KFP_ENDPOINT=http://... PARAMS="dataset_uri=s3://..."
submit: $(STAMP)
	KFP_ENDPOINT=$(KFP_ENDPOINT) $(BIN)/python -m pipelines.submit $(PARAMS)

clean:
	rm -rf $(VENV) runs .bench .pytest_cache .ruff_cache
