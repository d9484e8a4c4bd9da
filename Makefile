# Two commands a newcomer needs: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the token host, the mTLS front (nginx + libp11's engine), the tests and the
# crash tooling need (strace injects the I/O errors of tests/integration/test_io_errors.py;
# zstd, lz4 and xz compress a real core as systemd-coredump does, for the scanner's tests;
# prometheus scrapes the service's metrics listener in tests/integration/test_metrics.py).
APT_PACKAGES := softhsm2 p11-kit p11-kit-modules opensc gdb openssl nginx libengine-pkcs11-openssl strace openssh-client zstd lz4 xz-utils prometheus
APT_PACKAGES += systemd  # systemd-analyze verify/security checks the units in systemd/ (tests/units)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
GEN := signer/v1/signer_pb2.py signer/v1/signer_pb2_grpc.py signer/v1/signer_pb2.pyi
PYTEST_ARGS ?=

.PHONY: all deps apt venv proto run test unit integration crash audit bench soak fuzz lint typecheck clean

all: deps

deps: apt venv proto

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

proto: $(GEN)

# google/rpc/status.proto comes with googleapis-common-protos (a dependency, which also ships
# its generated status_pb2): the directory that holds its google/ is an include root.
# google/protobuf/*.proto comes with grpc_tools itself.
$(GEN) &: proto/signer/v1/signer.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto \
	  -I"$$($(PY) -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')" \
	  --python_out=. --grpc_python_out=. --pyi_out=. proto/signer/v1/signer.proto

# Token host, service (unix:var/run/signer.sock) and mTLS front (127.0.0.1:50051) in the
# foreground, metrics on http://127.0.0.1:9464/metrics; Ctrl-C stops all three.
run: deps
	$(VENV)/bin/signer run --dir var

lint: deps
	$(VENV)/bin/ruff check signer benchmarks tests fuzz
	$(VENV)/bin/ruff format --check signer benchmarks tests fuzz

typecheck: deps
	$(VENV)/bin/mypy

# deps installed what every test needs, so none may skip: SIGNER_TESTS_MUST_RUN turns a skip
# into a failure that names what was missing (tests/conftest.py).
MUST_RUN := SIGNER_TESTS_MUST_RUN=1

test: deps lint typecheck
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

clean:
	rm -rf $(VENV) $(GEN) .mypy_cache .ruff_cache .pytest_cache
