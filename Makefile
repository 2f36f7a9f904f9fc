# Two commands for a fresh machine (see README.md):
#   make demo   the main job on the built-in tiny model and synthetic data
#   make test   set-up if needed, build, all tests
# Set-up (scripts/setup.sh) installs the PyTorch 2.11.0 wheel (libtorch) into a per-user cache folder outside
# the checkout, shared by every clone; scripts/with-torch runs a command in that environment.

SHELL := /bin/bash
CARGO := scripts/with-torch cargo
DEMO := target/demo
BIN := target/debug

.PHONY: setup build test demo lint bench-data bench-forward clean-demo

setup:
	@scripts/setup.sh >/dev/null

build: setup
	$(CARGO) build --all-targets

test: build
	$(CARGO) test --all-targets --no-fail-fast
	cargo fmt --check

lint: setup
	cargo fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

demo: build
	rm -rf $(DEMO)
	$(BIN)/ddpo init-model --out $(DEMO)/model --preset tiny
	$(BIN)/ddpo synth --out $(DEMO)/data --pairs 512 --shards 2 --seed 1
	$(BIN)/ddpo synth --out $(DEMO)/data --pairs 64 --shards 1 --seed 2 --prefix eval
	$(BIN)/ddpo validate --config configs/tiny-cpu.toml

# Data-pipeline throughput on one core (see BENCHMARKS.md).
bench-forward: setup
	$(CARGO) bench --bench forward

bench-data: setup
	$(CARGO) bench --bench data_pipeline

clean-demo:
	rm -rf $(DEMO)
