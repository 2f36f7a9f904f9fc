# Two commands for a fresh machine (see README.md):
#   make demo   the main job on the built-in tiny model and synthetic data
#   make test   set-up if needed, build, all tests
# Set-up (scripts/setup.sh) installs the PyTorch 2.11.0 wheel (libtorch) into a per-user cache folder outside
# the checkout, shared by every clone; scripts/with-torch runs a command in that environment.

SHELL := /bin/bash
CARGO := scripts/with-torch cargo
DEMO := target/demo
BIN := target/debug

# CI (.ci/run) calls `make test`: cargo tests (library, binaries, integration tests; the benches are built, not
# run), formatting, clippy with warnings as errors, the API docs with warnings as errors, the deploy checks and a
# real one-node Slurm cluster.
.PHONY: setup build test test-slurm test-deploy demo lint bench-data bench-forward bench-train bench-collective bench-step bench-generate clean-demo

setup:
	@scripts/setup.sh >/dev/null

build: setup
	$(CARGO) build --all-targets

test: build
	$(CARGO) test --lib --bins --tests --no-fail-fast
	cargo fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps
	BIN=$(BIN) tests/deploy/check.sh
	BIN=$(BIN) tests/slurm/run.sh

# A real one-node Slurm cluster (root; installs slurm-wlm and munge if missing): deploy/slurm/ddpo.sbatch end to end.
test-slurm: build
	BIN=$(BIN) tests/slurm/run.sh

# shellcheck, Kubernetes manifests (render + schema validation), no machine specifics in deploy/, local launcher.
test-deploy: build
	BIN=$(BIN) tests/deploy/check.sh

lint: setup
	cargo fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

demo: build
	BIN=$(BIN) scripts/demo.sh

# Data-pipeline throughput on one core (see BENCHMARKS.md).
bench-forward: setup
	$(CARGO) bench --bench forward

# Training step (cached vs online reference), precompute vs transformers, peak memory (see BENCHMARKS.md).
bench-train: setup
	$(CARGO) bench --bench train_step

bench-data: setup
	$(CARGO) bench --bench data_pipeline

# Ring all-reduce bus bandwidth vs PyTorch Gloo on loopback, 2 and 3 ranks (see BENCHMARKS.md).
bench-collective: setup
	$(CARGO) bench --bench collective

# The training step side by side with the Python (transformers, RLHF-V-style) baseline (see BENCHMARKS.md).
bench-step: setup
	$(CARGO) bench --bench ddpo_step

# Generation tokens/s vs transformers' generate: greedy at batch 1 and 8, K = 4 samples (see BENCHMARKS.md).
bench-generate: setup
	$(CARGO) bench --bench generate

clean-demo:
	rm -rf $(DEMO)
