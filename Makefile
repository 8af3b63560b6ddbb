# StreetVision. `make run` and `make test` set up their own virtual environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/local
ARGS   ?=
REGISTRY ?= ghcr.io/streetvision
TAG      ?= 0.1.0
BASE_IMAGE  := $(REGISTRY)/streetvision-base:$(TAG)
TRAIN_IMAGE := $(REGISTRY)/streetvision-train:$(TAG)
GIT_SHA  := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
DOCKER_BUILD ?= DOCKER_BUILDKIT=0 docker build --network host

.PHONY: venv test test-fast test-faults lint bench run compile submit images push clean

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

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -s -rs -m faults $(PYTEST_ARGS)

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
	KFP_ENDPOINT=$(KFP_ENDPOINT) $(BIN)/python -m pipelines.submit --service-account "$(SERVICE_ACCOUNT)" $(PARAMS)

# Build both images with the tags the components reference, from the repository root (the .dockerignore
# keeps the context to pyproject.toml, constraints.txt, README.md and streetvision/).
images: $(STAMP)
	$(DOCKER_BUILD) -f images/base/Dockerfile --build-arg STREETVISION_GIT_SHA=$(GIT_SHA) \
		--build-arg STREETVISION_VERSION=$(TAG) -t $(BASE_IMAGE) .
	$(DOCKER_BUILD) -f images/train/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(TRAIN_IMAGE) .
	docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e $(BASE_IMAGE) -e $(TRAIN_IMAGE)

push:
	docker push $(BASE_IMAGE)
	docker push $(TRAIN_IMAGE)

clean:
	rm -rf $(VENV) runs .bench .pytest_cache .ruff_cache
