# taas: `make` builds the release binary; `make test` is the one test command.
CARGO ?= cargo

.PHONY: all build run test lint fmt clean

all: build

build:
	$(CARGO) build --release --locked

# The relay on its embedded defaults: file store, self-signed certificate made on
# first start under taas-data/, loopback, port 8443.
run:
	$(CARGO) run --release --locked -- serve

# Everything CI runs: format, lints, then every test (unit, integration, examples).
test: lint
	$(CARGO) test --locked --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
