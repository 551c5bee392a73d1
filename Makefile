# taas: `make` builds the release binary; `make check` is the test command
# (the README's quick start, and what .ci/run runs); `make test` is its quicker half.
CARGO ?= cargo

.PHONY: all build run check test lint fmt clean bench release verify-release install

all: build

build:
	$(CARGO) build --release --locked

# The relay on its embedded defaults: file store, self-signed certificate made on
# first start under taas-data/, loopback, port 8443.
run:
	$(CARGO) run --release --locked -- serve

# Everything CI runs: every test, then the reproducibility check (two clean
# release builds, about three minutes on two cores).
check: test verify-release

# Format, lints, then every test (unit, integration, examples, the browser).
test: lint
	$(CARGO) test --locked --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Speed and memory, against direct loopback measured in the same run.
bench:
	$(CARGO) build --release --locked
	sync
	$(CARGO) run --release --locked --example bench

# A reproducible release binary: locked dependencies, checkout and cargo paths
# remapped, no timestamps (build.rs embeds only the git revision), stripped
# (profile.release). Its SHA-256 is written beside it.
PREFIX ?= /usr/local
DESTDIR ?=
CARGO_HOME ?= $(HOME)/.cargo
DIST ?= dist
REPRO_FLAGS = --remap-path-prefix=$(CURDIR)=/taas --remap-path-prefix=$(CARGO_HOME)=/cargo -C link-arg=-Wl,--build-id=none

release:
	RUSTFLAGS="$(REPRO_FLAGS)" CARGO_INCREMENTAL=0 $(CARGO) build --release --locked --target-dir target/repro
	mkdir -p $(DIST)
	cp target/repro/release/taas $(DIST)/taas
	cd $(DIST) && sha256sum taas > taas.sha256
	@cat $(DIST)/taas.sha256

# Builds the committed HEAD twice, from two checkouts at different paths, and
# compares the binaries.
verify-release:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	git clone -q "$(CURDIR)" "$$tmp/one"; git clone -q "$(CURDIR)" "$$tmp/second-checkout"; \
	$(MAKE) -s -C "$$tmp/one" release >/dev/null; \
	$(MAKE) -s -C "$$tmp/second-checkout" release >/dev/null; \
	a=$$(cut -d' ' -f1 "$$tmp/one/$(DIST)/taas.sha256"); b=$$(cut -d' ' -f1 "$$tmp/second-checkout/$(DIST)/taas.sha256"); \
	if [ "$$a" = "$$b" ]; then echo "reproducible: $$a"; else \
	  echo "NOT reproducible: $$a vs $$b"; cmp -l "$$tmp/one/$(DIST)/taas" "$$tmp/second-checkout/$(DIST)/taas" | head -20; exit 1; fi

install: build
	install -D -m 0755 target/release/taas $(DESTDIR)$(PREFIX)/bin/taas
	install -D -m 0644 contrib/taas.service $(DESTDIR)$(PREFIX)/lib/systemd/system/taas.service
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/taas/README.md

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
