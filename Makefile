# metald: `make demo` boots a real VM through the API; `make test` runs the whole suite.
# Both install what is missing first (apt, npm) and build the guest image from Debian packages.

GUEST_DIR ?= $(CURDIR)/target/guest
CARGO ?= cargo

.PHONY: deps guest build demo test lint unit bench install

deps:
	scripts/install-deps.sh

guest: deps
	scripts/build-guest-image.sh $(GUEST_DIR)

build: deps
	$(CARGO) build --workspace --bins

demo: guest build
	GUEST_DIR=$(GUEST_DIR) scripts/demo.sh

lint: deps
	target/tools/node_modules/.bin/buf lint
	scripts/verify-unit.sh
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The whole suite: unit tests, then end-to-end tests that boot real VMs (QEMU here; Firecracker
# too when its binary is installed). METALD_REQUIRE_E2E turns a missing prerequisite into a failure.
test: guest lint build
	@if command -v firecracker >/dev/null 2>&1 || [ -x "$${UNKEY_METALD_FIRECRACKER_BIN:-}" ]; then \
		echo "test: firecracker found: the Firecracker backend tests run (tiny test guest)"; \
	else \
		echo "test: SKIPPING the Firecracker backend tests: no firecracker binary (not in any package registry; put one on PATH or set UNKEY_METALD_FIRECRACKER_BIN)"; \
	fi
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		METALD_GUEST_DIR=$(GUEST_DIR) METALD_REQUIRE_E2E=1 $(CARGO) nextest run --workspace --test-threads 2 --no-fail-fast; \
	else \
		METALD_GUEST_DIR=$(GUEST_DIR) METALD_REQUIRE_E2E=1 $(CARGO) test --workspace -- --test-threads=2; \
	fi

bench: guest build
	$(CARGO) build --release -p billaged
	METALD_GUEST_DIR=$(GUEST_DIR) $(CARGO) bench -p metald --bench boot --bench isolation --bench metering --bench billing

# Release binaries, the metald user and directories, and the systemd unit (see deploy/).
install: deps
	scripts/install.sh
