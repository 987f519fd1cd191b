#!/usr/bin/env bash
# Checks that the README's commands work from nothing: clones this repository's committed HEAD
# into a temporary directory (no target/, no guest image, no tools from earlier builds) and runs
# there, in order, `make deps`, `make guest`, `make build` and `make demo` (then `make test` when
# asked), each timed; exits non-zero at the first step that fails.
#
# Usage: scripts/fresh-check.sh [demo|test ...]   (default: demo; `make fresh-check`)
# Environment: FRESH_CHECK_KEEP=1 keeps the clone (its path is printed).
#
# It cannot uninstall what this machine already has: to prove an install step, remove the package
# first (e.g. `apt-get remove -y iputils-ping`), then run this.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(demo)
for t in "${targets[@]}"; do
	[[ $t == demo || $t == test ]] || { echo "fresh-check: unknown target $t (demo, test)" >&2; exit 2; }
done

if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
	echo "fresh-check: note: uncommitted changes in $repo are not checked (the clone is of HEAD)"
fi

tmp=$(mktemp -d /tmp/metald-fresh.XXXXXX)
if [ "${FRESH_CHECK_KEEP:-0}" != 1 ]; then
	trap 'rm -rf "$tmp"' EXIT
fi

steps=() times=()
run_step() {
	local name=$1 start end status=0
	shift
	printf '\n\033[1m== fresh-check: %s\033[0m\n' "$name"
	start=$(date +%s.%N)
	"$@" || status=$?
	end=$(date +%s.%N)
	steps+=("$name") times+=("$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }')")
	if [ "$status" -ne 0 ]; then
		report
		echo "fresh-check: FAIL: '$name' exited $status (clone: $tmp)" >&2
		trap - EXIT
		exit 1
	fi
}
report() {
	echo
	echo "fresh-check: seconds per step"
	for i in "${!steps[@]}"; do
		printf '  %-34s %8s s\n' "${steps[$i]}" "${times[$i]}"
	done
}

run_step "git clone (HEAD $(git -C "$repo" rev-parse --short HEAD))" \
	git clone -q --no-local "$repo" "$tmp/metald"
cd "$tmp/metald"
run_step "make deps" make deps
run_step "make guest" make guest
run_step "make build" make build
for t in "${targets[@]}"; do
	run_step "make $t" make "$t"
done
report
echo "fresh-check: ok: a fresh clone passed: make ${targets[*]}"
[ "${FRESH_CHECK_KEEP:-0}" != 1 ] || echo "fresh-check: clone kept at $tmp/metald"
