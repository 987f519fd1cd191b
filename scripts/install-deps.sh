#!/usr/bin/env bash
# Installs every program that metald, its scripts, its tests and its benches run on the host, and
# that this machine lacks, then checks that each one resolves on PATH: a missing package fails
# here, at the start of `make`, not in the middle of a test.
#   Debian packages: the table below (program -> package).
#   npm: the buf CLI (@bufbuild/buf) into target/tools, a Connect/gRPC client nobody here wrote.
# Not installed here: the Rust toolchain (rustup; checked), and Firecracker, which is in no
# package registry (its tests are skipped, with why, when no binary is on PATH).
# With --fuzz (`make fuzz` only): also cargo-fuzz (cargo install from crates.io, a few minutes of
# compiling, which is why `make test` does not ask for it: CI replays the fuzz corpus on stable)
# and the nightly toolchain its sanitizer flags need (rustup).
# Safe to run again: it only installs what is missing. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz=false
case "${1:-}" in
	--fuzz) fuzz=true ;;
	"") ;;
	*) echo "usage: $0 [--fuzz]" >&2; exit 2 ;;
esac

# Every host program run by code (Command::new, and programs run through nsenter or sh -c),
# scripts/, the Makefile, tests and benches, with the Debian 12 package that provides it (a
# program given as an absolute path is checked at that path: `type -P` takes paths too).
# Programs that only run inside the guest are not here; the guest image build brings those.
programs=(
	# VMM for full guests anywhere (TCG) and on hardware KVM.
	qemu-system-x86_64:qemu-system-x86
	# API code generation (metald-proto's build script).
	protoc:protobuf-compiler
	# Building Rust code: the linker, and C in libsqlite3-sys and zstd-sys.
	cc:gcc
	make:make
	# Guest image build (scripts/build-guest-image.sh).
	busybox:busybox-static
	mkfs.ext4:e2fsprogs
	debugfs:e2fsprogs
	cpio:cpio
	lz4:lz4
	modinfo:kmod
	flock:util-linux
	# Isolation: namespaces, links, rate limits, firewall (metald), and the tests that look at them.
	ip:iproute2
	tc:iproute2
	nft:nftables
	nsenter:util-linux
	setpriv:util-linux
	umount:mount
	# Tests and demo: reachability, processes, Firecracker's API socket.
	ping:iputils-ping
	kill:procps
	pkill:procps
	curl:curl
	# The PostgreSQL store's tests start a throwaway server, as the postgres user
	# (crates/metald-store/src/testing/pg.rs). Debian keeps the server's programs off PATH:
	# named by path, `has` checks that the file is there and executable.
	/usr/lib/postgresql/15/bin/initdb:postgresql-15
	runuser:util-linux
	# Benches (make bench): HTTP load with latency percentiles, and TLS handshakes per second.
	hey:hey
	openssl:openssl
	# Shell script lint (make lint): scripts/*.sh and the guest's scripts under guest/.
	shellcheck:shellcheck
	# `systemd-analyze verify` of the unit (make lint), and scripts/install.sh.
	systemd-analyze:systemd
	# The buf CLI's installer and its interpreter.
	npm:npm
	node:nodejs
)

has() { type -P "$1" >/dev/null 2>&1; }

missing=()
for entry in "${programs[@]}"; do
	program=${entry%%:*} package=${entry#*:}
	if ! has "$program" && [[ " ${missing[*]} " != *" $package "* ]]; then
		missing+=("$package")
	fi
done
# A Node.js from elsewhere (nodesource) brings its own npm and conflicts with Debian's npm.
if has npm && has node; then
	filtered=()
	for p in "${missing[@]}"; do [[ $p == npm || $p == nodejs ]] || filtered+=("$p"); done
	missing=("${filtered[@]}")
fi
if [ "${#missing[@]}" -gt 0 ]; then
	echo "install-deps: apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: need root to install ${missing[*]}" >&2
		exit 1
	fi
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

buf=target/tools/node_modules/.bin/buf
if [ ! -x "$buf" ] && has npm; then
	echo "install-deps: npm install @bufbuild/buf into target/tools"
	mkdir -p target/tools
	npm install --silent --no-audit --no-fund --prefix target/tools @bufbuild/buf@1 >/dev/null
fi

if $fuzz; then
	if ! rustup run nightly rustc --version >/dev/null 2>&1 && has rustup; then
		echo "install-deps: rustup toolchain install nightly"
		rustup toolchain install nightly --profile minimal
	fi
	if ! cargo fuzz --version >/dev/null 2>&1 && has cargo; then
		echo "install-deps: cargo install cargo-fuzz"
		cargo install --locked cargo-fuzz
	fi
fi

# The one check: every program resolves on PATH (and buf and cargo where they are expected).
absent=()
for entry in "${programs[@]}"; do
	program=${entry%%:*} package=${entry#*:}
	has "$program" || absent+=("$program (Debian package $package)")
done
[ -x "$buf" ] && "$buf" --version >/dev/null 2>&1 || absent+=("$buf (npm package @bufbuild/buf)")
has cargo || absent+=("cargo (the Rust toolchain, from rustup)")
if $fuzz; then
	rustup run nightly rustc --version >/dev/null 2>&1 || absent+=("the nightly Rust toolchain (rustup)")
	cargo fuzz --version >/dev/null 2>&1 || absent+=("cargo-fuzz (crates.io)")
fi
if [ "${#absent[@]}" -gt 0 ]; then
	echo "install-deps: still missing after install:" >&2
	printf '  %s\n' "${absent[@]}" >&2
	exit 1
fi
echo "install-deps: ok: ${#programs[@]} programs on PATH ($(qemu-system-x86_64 --version | head -1); protoc $(protoc --version | cut -d' ' -f2); buf $("$buf" --version))"
