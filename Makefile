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
# BuildKit through buildx where it is installed; Debian's docker.io 20.10 has no buildx, and there the
# legacy builder is what works (it also runs RUN steps on the host network, with no bridge).
DOCKER_BUILD ?= $(if $(shell docker buildx version 2>/dev/null),docker buildx build --load,DOCKER_BUILDKIT=0 docker build) --network host
TORCH_INDEX_URL ?=

.PHONY: venv test test-fast test-faults lint bench run compile submit deploy-check images push clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt -e '.[train,pipelines,dev]'
	touch $@

venv: $(STAMP)

# The suite runs in PYTEST_WORKERS processes (pytest-xdist; 0: in this one), a test file to a worker, each
# worker's torch on one thread, so the workers, not torch's threads, share the cores.
PYTEST_WORKERS ?= 2
XDIST = -n $(PYTEST_WORKERS) --dist loadfile
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs $(XDIST) -m "not slow and not docker" $(PYTEST_ARGS)

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -s -rs -m faults $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check streetvision components pipelines tests bench
	$(BIN)/ruff format --check streetvision components pipelines tests bench

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH)

run: $(STAMP)
	$(BIN)/streetvision run --out $(OUT) $(ARGS)

# Regenerate pipelines/streetvision.yaml and components/*.yaml. Other images (REGISTRY / TAG, or digests in
# BASE_REF / TRAIN_REF as `make push` prints them) or COMPILE_ARGS options write build/streetvision.yaml.
BASE_REF  ?= $(BASE_IMAGE)
TRAIN_REF ?= $(TRAIN_IMAGE)
compile: $(STAMP)
	STREETVISION_BASE_IMAGE=$(BASE_REF) STREETVISION_TRAIN_IMAGE=$(TRAIN_REF) \
		$(BIN)/python -m pipelines.compile $(COMPILE_ARGS)

# Upload the compiled pipeline and start a run: make submit KFP_ENDPOINT=http://... PARAMS="dataset_uri=s3://..."
# (PACKAGE=build/streetvision.yaml for a pipeline compiled with options; NO_CACHE=1 re-runs every step).
PACKAGE ?= pipelines/streetvision.yaml
SERVICE_ACCOUNT ?= streetvision-pipeline-runner
OVERLAY ?= manifests/overlays/example
submit: $(STAMP)
	KFP_ENDPOINT=$(KFP_ENDPOINT) $(BIN)/python -m pipelines.submit --package $(PACKAGE) \
		--service-account "$(SERVICE_ACCOUNT)" $(if $(NO_CACHE),--no-cache) $(PARAMS)

# Before applying anything: render OVERLAY and check it against PACKAGE (Secret keys, ServiceAccount,
# launcher config and object store).
deploy-check: $(STAMP)
	$(BIN)/python -m pipelines.deploy_check --overlay $(OVERLAY) --package $(PACKAGE) --service-account $(SERVICE_ACCOUNT)

# Build both images with the tags the components reference, from the repository root (the .dockerignore
# keeps the context to pyproject.toml, constraints.txt, README.md and streetvision/).
images: $(STAMP)
	$(DOCKER_BUILD) -f images/base/Dockerfile --build-arg STREETVISION_GIT_SHA=$(GIT_SHA) \
		--build-arg STREETVISION_VERSION=$(TAG) -t $(BASE_IMAGE) .
	$(DOCKER_BUILD) -f images/train/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t $(TRAIN_IMAGE) .
	docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e $(BASE_IMAGE) -e $(TRAIN_IMAGE)

# Push both images, then print their digests and the command that compiles the pipeline pinned to them.
push:
	docker push $(BASE_IMAGE)
	docker push $(TRAIN_IMAGE)
	@base=$$(docker image inspect --format '{{index .RepoDigests 0}}' $(BASE_IMAGE)) && \
	 train=$$(docker image inspect --format '{{index .RepoDigests 0}}' $(TRAIN_IMAGE)) && \
	 echo "$$base" && echo "$$train" && \
	 echo "pin them: make compile BASE_REF=$$base TRAIN_REF=$$train"

clean:
	rm -rf $(VENV) runs .bench .pytest_cache .ruff_cache
