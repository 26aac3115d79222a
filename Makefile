# candle-bitnet — the commands a developer and CI need.
CARGO ?= cargo

.PHONY: build test lint fmt bench clean

build:
	$(CARGO) build --release

# Unit, integration and doc tests; benches and examples are compiled, not run.
test:
	$(CARGO) test
	$(CARGO) build --benches --examples

lint:
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
