#!/usr/bin/env bash
# Installs what metald's build, demo and tests need and this machine lacks:
#   Debian packages: QEMU (the VMM that runs anywhere), protoc (API code generation), and the
#   tools the guest image build uses (busybox-static, e2fsprogs, cpio, lz4, kmod).
#   npm: the buf CLI (@bufbuild/buf) into target/tools, a Connect/gRPC client nobody here wrote.
# Safe to run again: it only installs what is missing. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

# nftables, iproute2 (tc) and util-linux (nsenter, setpriv) for VM isolation and its tests;
# systemd for `systemd-analyze verify` of the unit.
packages=(qemu-system-x86 protobuf-compiler busybox-static e2fsprogs cpio lz4 kmod iproute2 curl file
	nftables util-linux systemd)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v npm >/dev/null 2>&1; then
	missing+=(nodejs npm)
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
if [ ! -x "$buf" ]; then
	echo "install-deps: npm install @bufbuild/buf into target/tools"
	mkdir -p target/tools
	npm install --silent --no-audit --no-fund --prefix target/tools @bufbuild/buf@1 >/dev/null
fi
"$buf" --version >/dev/null

command -v cargo >/dev/null || { echo "install-deps: cargo (Rust toolchain) is required" >&2; exit 1; }
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -1); protoc $(protoc --version | cut -d' ' -f2); buf $("$buf" --version))"
