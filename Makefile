# candle-bitnet — the commands a developer and CI need.
CARGO ?= cargo

.PHONY: build test lint fmt bench clean

build:
	$(CARGO) build --release

test:
	$(CARGO) test --all-targets
	$(CARGO) test --doc

lint:
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
