# metald: `make demo` boots a real VM through the API; `make test` runs the whole suite.
# Both install what is missing first (apt, npm) and build the guest image from Debian packages.

GUEST_DIR ?= $(CURDIR)/target/guest
CARGO ?= cargo

.PHONY: deps guest build demo test lint unit bench install fresh-check fuzz chaos

deps:
	scripts/install-deps.sh

guest: deps
	scripts/build-guest-image.sh $(GUEST_DIR)

build: deps
	$(CARGO) build --workspace --bins

demo: guest build
	GUEST_DIR=$(GUEST_DIR) scripts/demo.sh

# Shell: the host scripts (bash) and every guest file that is a shell script (#!/bin/sh: busybox
# sh in the guest, so checked as POSIX sh; guest/README.md is the guest contract).
lint: deps
	shellcheck scripts/*.sh
	find guest -type f -exec sh -c 'head -n 1 "$$1" | grep -q "^#!/bin/sh"' sh {} \; -print0 | \
		sort -z | xargs -0 shellcheck -s sh
	target/tools/node_modules/.bin/buf lint
	scripts/verify-unit.sh
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The whole suite: unit tests, then end-to-end tests that boot real VMs (QEMU here; Firecracker
# too when its binary is installed). METALD_REQUIRE_E2E turns a missing prerequisite that `make`
# installs into a failure; what it cannot install (Firecracker, hardware KVM) makes its tests
# skipped, counted as such by the runner and listed with why after the run.
E2E_ENV = METALD_GUEST_DIR=$(GUEST_DIR) METALD_REQUIRE_E2E=1

test: guest lint build
	@status=0; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(E2E_ENV) $(CARGO) nextest run --workspace --test-threads 2 --no-fail-fast --status-level skip || status=$$?; \
	else \
		$(E2E_ENV) $(CARGO) test --workspace -- --test-threads=2 || status=$$?; \
	fi; \
	$(E2E_ENV) $(CARGO) test -q -p metald --test e2e -- --skip-report || status=$$?; \
	exit $$status

# The chaos run of issue 13 (crates/metald/tests/e2e/chaos.rs): clients drive real VMs while
# metald is killed with SIGKILL CHAOS_KILLS times (and VMMs now and then) and restarted; after
# each restart every invariant is checked, and the report is printed. `make test` runs the same
# test with 20 kills; CHAOS_SEED repeats a run's random choices.
CHAOS_KILLS ?= 200

chaos: guest build
	$(E2E_ENV) METALD_CHAOS_KILLS=$(CHAOS_KILLS) $(if $(CHAOS_SEED),METALD_CHAOS_SEED=$(CHAOS_SEED)) \
		$(CARGO) test -p metald --test e2e -- chaos:: --nocapture

# Each libFuzzer target (fuzz/, nightly) for FUZZ_SECONDS, one process at a time. libFuzzer adds
# the inputs it finds to the first corpus directory, fuzz/target/corpus/<target> (not committed),
# and reads the committed seeds in fuzz/corpus/<target> without writing there; a crash is saved
# in fuzz/artifacts/<target>/. `make test` replays the seeds on stable (crates/metald/tests/
# fuzz_corpus.rs), so only this target needs cargo-fuzz.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= strict_json firecracker_metrics qmp_reader ids_and_kernel_args netlink_stats

fuzz:
	scripts/install-deps.sh --fuzz
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t: $(FUZZ_SECONDS) s"; \
		mkdir -p fuzz/target/corpus/$$t && \
		cargo +nightly fuzz run $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

# Proves the README's commands work from nothing: a fresh clone in a temporary directory runs
# `make demo` (FRESH_TARGET=test for the suite), with each step timed.
fresh-check:
	scripts/fresh-check.sh $(FRESH_TARGET)

bench: guest build
	$(CARGO) build --release -p billaged
	METALD_GUEST_DIR=$(GUEST_DIR) $(CARGO) bench -p metald --bench boot --bench isolation --bench metering --bench billing --bench identity --bench firewall --bench suspend

# Release binaries, the metald user and directories, and the systemd unit (see deploy/).
install: deps
	scripts/install.sh
