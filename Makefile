# Two commands a newcomer needs: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the token host, the mTLS front (nginx + libp11's engine), the tests and the
# crash tooling need (strace injects the I/O errors of tests/integration/test_io_errors.py;
# zstd, lz4 and xz compress a real core as systemd-coredump does, for the scanner's tests;
# prometheus scrapes the service's metrics listener in tests/integration/test_metrics.py;
# docker.io, docker-compose and debootstrap build the images and run tests/containers' stack,
# and apparmor, which docker.io only recommends: Debian 12's kernel enables AppArmor, and its
# dockerd 20.10 starts no container without apparmor_parser (fixed in 23.0, moby/moby#44902);
# make run needs none of them).
APT_PACKAGES := softhsm2 p11-kit p11-kit-modules opensc gdb openssl nginx libengine-pkcs11-openssl strace openssh-client zstd lz4 xz-utils prometheus docker.io docker-compose debootstrap apparmor
APT_PACKAGES += systemd  # systemd-analyze verify/security checks the units in systemd/ (tests/units)
APT_PACKAGES += postgresql-15  # a throwaway cluster per test session for the PostgreSQL store (tests/postgres.py)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
GEN := signer/v1/signer_pb2.py signer/v1/signer_pb2_grpc.py signer/v1/signer_pb2.pyi
PYTEST_ARGS ?=

.PHONY: all deps apt venv proto node run test unit integration crash audit bench soak fuzz lint typecheck clean
.PHONY: docker-engine docker-engine-stop base-image wheel wheelhouse images compose-up compose-down containers

all: deps

deps: apt venv proto node

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is needed (PYTHON=$(PYTHON))"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,scan,service]'
	@touch $@

# Node's jose, a relying party with no code of ours, verifies the issuers' tokens in
# tests/integration/test_issuers.py. Not in APT_PACKAGES: a Node from elsewhere (NodeSource's
# nodejs, which conflicts with Debian's npm package) is used as it is; Debian 12's own is
# Node 18, hence jose 5 (jose 6 needs Node 20's global crypto).
NODE_DIR := tests/node
node: $(NODE_DIR)/node_modules/.installed

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nodejs npm; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

proto: $(GEN)

# google/rpc/status.proto comes with googleapis-common-protos (a dependency, which also ships
# its generated status_pb2): the directory that holds its google/ is an include root.
# google/protobuf/*.proto comes with grpc_tools itself.
$(GEN) &: proto/signer/v1/signer.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto \
	  -I"$$($(PY) -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')" \
	  --python_out=. --grpc_python_out=. --pyi_out=. proto/signer/v1/signer.proto

# Token host, service (unix:var/run/signer.sock) and mTLS front (127.0.0.1:50051) in the
# foreground, metrics on http://127.0.0.1:9464/metrics, the tokens scope's issuer on
# https://localhost:8443/tokens; Ctrl-C stops all three.
run: deps
	$(VENV)/bin/signer run --dir var

lint: deps
	$(VENV)/bin/ruff check signer benchmarks tests fuzz docker
	$(VENV)/bin/ruff format --check signer benchmarks tests fuzz docker

typecheck: deps
	$(VENV)/bin/mypy

# deps installed what every test needs, so none may skip: SIGNER_TESTS_MUST_RUN turns a skip
# into a failure that names what was missing (tests/conftest.py).
MUST_RUN := SIGNER_TESTS_MUST_RUN=1

# The images are built first (tests/containers runs the compose stack from them): about 90 s
# from nothing, about 2 s when nothing changed (README, "Deploying").
test: deps lint typecheck images
	$(MUST_RUN) $(PY) -m pytest $(PYTEST_ARGS)

unit: deps
	$(MUST_RUN) $(PY) -m pytest tests/unit tests/benchmarks $(PYTEST_ARGS)

integration: deps
	$(MUST_RUN) $(PY) -m pytest tests/integration $(PYTEST_ARGS)

crash: deps
	$(MUST_RUN) $(PY) -m pytest tests/crash $(PYTEST_ARGS)

# The full crash campaign: every mechanism at every moment with every collector, plus controls.
# Report in var/audit/report.md and var/audit/report.json.
audit: deps
	$(VENV)/bin/signer crash-test --report var/audit

# Scanner speed against grep -F and YARA on a real core of the service, and blind-mode recall,
# measured in one run: var/bench/latest.json and latest.md (docs/benchmarks.md). BENCH_ARGS
# passes options, e.g. BENCH_ARGS='--scenarios scan --runs 3'.
BENCH_ARGS ?=

bench: deps $(VENV)/.bench-installed
	$(PY) -m benchmarks $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,scan,service,bench]'
	@touch $@

# The soak (issue 12): every RPC from many callers for SOAK_MINUTES, the token host restarted
# every few minutes; fails on a wrong signature, a lost audit record, a status no call should
# get (INTERNAL, a hang), or RSS growth. var/soak/latest.json; state kept in var/soak/work.
# SOAK_ARGS passes options, e.g. SOAK_ARGS='--restart-every 5 --signers 8' (tests/soak/soak.py).
SOAK_MINUTES ?= 30
SOAK_ARGS ?=

soak: deps
	$(PY) -m tests.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Coverage-guided fuzzing (atheris) of the parsers that meet hostile input: the ELF reader, the
# scan in both modes, policy, configuration, key files, JWTs (fuzz/targets.py). One target at a
# time for FUZZ_SECONDS each, a target's RSS bounded by FUZZ_RSS_MB; prints executions,
# coverage and findings per target (var/fuzz/report.json). A crashing input is kept in
# fuzz/crashes/<target>/ and `make test` replays it. FUZZ_ARGS passes options, e.g.
# FUZZ_ARGS='--targets elf,policy --merge' (--merge adds new-coverage inputs to fuzz/corpus/).
FUZZ_SECONDS ?= 60
# Then every RPC through the real server (tests/integration/test_fuzz_rpc.py, Hypothesis),
# FUZZ_EXAMPLES random examples per test instead of make test's fixed few dozen.
FUZZ_EXAMPLES ?= 500
FUZZ_RSS_MB ?= 1024
FUZZ_ARGS ?=

fuzz: deps $(VENV)/.fuzz-installed
	$(PY) -m fuzz.campaign --seconds $(FUZZ_SECONDS) --rss-mb $(FUZZ_RSS_MB) $(FUZZ_ARGS)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/integration/test_fuzz_rpc.py -q \
	  -p no:cacheprovider -o timeout=0

$(VENV)/.fuzz-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,fuzz]'
	@touch $@

# --- Containers (issue 15; README, "Deploying") ------------------------------------------------
# Images from signer-base:bookworm, a Debian 12 base made here (debootstrap, docker import: no
# registry is needed), cached in ~/.cache/signer. TAG names the images compose.yaml runs.
TAG ?= dev
DOCKER ?= docker
COMPOSE ?= docker-compose
# The images' base: made here (base-image), or BASE=debian:bookworm-slim where a registry is
# reachable (README, "Deploying").
BASE ?= signer-base:bookworm
# --network host: an engine started with --bridge=none gives RUN steps no network otherwise.
# --force-rm: the legacy builder keeps a failed step's container.
BUILD = $(DOCKER) build --network host --force-rm -q --build-arg BASE=$(BASE) $(DOCKER_BUILD_ARGS)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := dist/signer-$(VERSION)-py3-none-any.whl
WHEELHOUSE := wheels/.complete
# The service image's pinned dependencies, as CPython 3.11 manylinux wheels (Debian 12's python3).
WHEEL_PLATFORM := --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64

# An engine where `docker info` finds none: Debian's dockerd without iptables or a bridge
# (containers use host networking and Unix sockets), overlay2 where it mounts, else vfs. It
# keeps running afterwards (docker-engine-stop stops the one started here).
docker-engine: apt
	@$(DOCKER) info >/dev/null 2>&1 || $(SUDO) docker/engine.sh start

docker-engine-stop:
	$(SUDO) docker/engine.sh stop

base-image: docker-engine
	$(SUDO) env DOCKER=$(DOCKER) docker/base/build-base.sh

# A fixed date in the wheel's entries: the same sources give the same wheel, so a fresh clone
# rebuilds no image layer. README.md is the wheel's long description (its METADATA): an edit
# there rebuilds the service image from the wheel's layer on (about 10 s).
wheel: $(WHEEL)

$(WHEEL): pyproject.toml README.md $(GEN) $(shell find signer -type f -not -path '*/__pycache__/*')
	rm -rf dist build
	SOURCE_DATE_EPOCH=315532800 $(PY) -m pip wheel -q --no-deps -w dist .
	rm -rf build

# Downloaded by the host's pip (its index, proxy and CA), installed in the image with --no-index.
wheelhouse: $(WHEELHOUSE)

$(WHEELHOUSE): docker/service/requirements.txt $(VENV)/.installed
	rm -rf wheels
	$(PY) -m pip download -q -d wheels $(WHEEL_PLATFORM) -r docker/service/requirements.txt
	@touch $@

# The build stages are tagged too (signer-*-stage): untagged, the prune below would take them,
# and with them the layer cache of the next build.
images: $(if $(filter signer-base:bookworm,$(BASE)),base-image,docker-engine) $(WHEEL) $(WHEELHOUSE)
	$(BUILD) -f softhsm/Dockerfile -t signer-token-host:$(TAG) .
	$(BUILD) -f docker/service/Dockerfile --target build -t signer-service-stage:$(TAG) .
	$(BUILD) -f docker/service/Dockerfile -t signer-service:$(TAG) .
	$(BUILD) -f docker/front/Dockerfile --build-arg SERVICE_IMAGE=signer-service:$(TAG) \
	  --target render -t signer-front-stage:$(TAG) .
	$(BUILD) -f docker/front/Dockerfile --build-arg SERVICE_IMAGE=signer-service:$(TAG) \
	  -t signer-front:$(TAG) .
	$(BUILD) -f docker/prometheus/Dockerfile -t signer-prometheus:$(TAG) .
	@# Images of ours that a build replaced (they carry the base's label), no one else's.
	@$(DOCKER) image prune -f --filter label=signer.base.key >/dev/null

# The stack on this machine: signer on 127.0.0.1:50051 (mTLS, dev CA; the client's certificate
# and key in var/compose/clients), Prometheus on 127.0.0.1:9090. compose-down keeps the volumes
# (the tokens); `docker-compose -p signer down -v` removes them.
compose-up: images
	mkdir -p var/compose/clients
	SIGNER_TAG=$(TAG) $(COMPOSE) -p signer up -d

compose-down:
	$(COMPOSE) -p signer down

# Only the container tests (images built first).
containers: deps images
	$(MUST_RUN) $(PY) -m pytest tests/containers $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(GEN) $(NODE_DIR)/node_modules .mypy_cache .ruff_cache .pytest_cache dist build wheels
