# Magnetar developer tasks. `make help` lists them.
CARGO_TARGET_DIR ?= $(HOME)/.cache/magnetar-target
export CARGO_TARGET_DIR

.PHONY: help run test lint fmt build release perf-meta perf-bookie

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

run: ## Run `magnetar standalone` over ./data
	cargo run --release -- standalone

test: ## The whole test suite: format check, then every test (CI runs this)
	cargo fmt --all -- --check
	cargo nextest run --workspace --profile ci

lint: ## rustfmt check and clippy with -D warnings (builds RocksDB once more, in check mode)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	cargo fmt --all

build: ## Debug build of everything
	cargo build --workspace --all-targets

release: ## Optimized binary
	cargo build --release

perf-meta: ## Metastore benchmark on a 3-node local cluster, recorded in docs/benchmarks.md
	cargo build --release
	$(CARGO_TARGET_DIR)/release/magnetar perf meta --concurrency 1 --record docs/benchmarks.md
	$(CARGO_TARGET_DIR)/release/magnetar perf meta --concurrency 256 --record docs/benchmarks.md

perf-bookie: ## Bookie add throughput/latency (fsync on) vs. the disk's limits, recorded in docs/benchmarks.md
	cargo build --release
	$(CARGO_TARGET_DIR)/release/magnetar perf bookie --record docs/benchmarks.md
