# refund-gate: every command a developer needs. `make run` serves, `make test` tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := proto/refundgate/v1/refund_gate.proto proto/refundgate/v1/admin.proto
PROTO_OUT := .

.PHONY: all venv run test image-test lint typecheck proto proto-check bench train clean

all: test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## Serve on 127.0.0.1:50051 with the committed default model; starts a local redis-server
## on a free port unless GATE_REDIS_URL is set.
run: $(STAMP)
	@deploy/run-dev.sh

## Every test, each fixture starting its own redis-server.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## Build deploy/Containerfile with podman and run it for real (a step of .ci/run; needs podman,
## runc and debootstrap, and root: a few minutes cold, under a minute cached).
image-test: $(STAMP)
	$(BIN)/python -m pytest -q -s deploy/tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy gate model bench

## Regenerate the protobuf/gRPC code from proto/ (never edit refundgate/ by hand).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) $(PROTO_SRC)
	@touch refundgate/__init__.py refundgate/v1/__init__.py

## Fails when the committed generated code is stale.
proto-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_proto_generated.py

## Latency and throughput of Check beside a bare echo server, plus scoring µs.
bench: $(STAMP)
	$(BIN)/python -m bench.run --out bench-results/bench.json

## Train a bundle beside the committed one: on history files (make train RECORDS="a.jsonl b.jsonl.gz",
## model/README.md) or, without RECORDS, on the simulator. ARGS passes more flags (--out, --reports ...).
train: $(STAMP)
	$(BIN)/python -m model.train $(if $(RECORDS),--records $(RECORDS)) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
