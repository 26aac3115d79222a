# candle-bitnet — the commands a developer and CI need.
CARGO ?= cargo

.PHONY: build test lint fmt bench bench-serve clean build-cuda test-cuda bench-cuda

build:
	$(CARGO) build --release

# Unit, integration and doc tests, with the default features (the CLI) and without (the library
# a candle app embeds); benches and examples are compiled, not run.
test:
	$(CARGO) test
	$(CARGO) test --no-default-features
	$(CARGO) run --no-default-features --example embed
	$(CARGO) build --benches --examples

lint:
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean

# The CUDA variant, in its own target dir (a feature switch would rebuild candle's kernels,
# ~4 min). nvcc comes from scripts/cuda-env.sh (pinned PyPI wheels, link stubs); with a system
# toolkit on PATH and CUDA_COMPUTE_CAP set, run with CUDA_ENV= instead.
CUDA_ENV ?= . scripts/cuda-env.sh &&
CUDA_CARGO = bash -c '$(CUDA_ENV) CARGO_TARGET_DIR=target/cuda $(CARGO) $(1)'

build-cuda:
	$(call CUDA_CARGO,build --release --features cuda --all-targets)

# The GPU tests (kernels vs the CPU op, the model on the fixture); they report "skipped"
# without a GPU. Needs the driver and the CUDA 13 libraries (cuBLAS, cuRAND, cudart) at run time.
test-cuda: build-cuda
	$(call CUDA_CARGO,test --release --features cuda --test cuda -- --nocapture)

# End-to-end throughput of a synthetic 2B-4T model against its dense baseline, no download
# (docs/benchmarks.md); under 10 minutes on 2 CPU cores.
bench:
	$(CARGO) run --release -- bench --preset 2b-4t --json target/bench-cpu.json

# `bitnet serve` over HTTP on a synthetic 2B-4T checkpoint (written once under target/):
# aggregate tokens/s and time to first token at 1, 4, 16 and 64 concurrent streaming clients.
bench-serve:
	$(CARGO) bench --bench serve -- --json target/bench-serve.json

bench-cuda:
	$(call CUDA_CARGO,run --release --features cuda -- bench --preset 2b-4t --device 0 --json target/bench-cuda.json)
