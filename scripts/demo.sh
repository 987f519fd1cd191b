#!/usr/bin/env bash
# Boots a real VM through metald's API on the embedded defaults (SQLite file, local asset store):
# starts metald, imports the guest image built by scripts/build-guest-image.sh, then drives the
# VM's life with curl exactly as an API client would. Run through `make demo`.
#
# metald's host side (the VM's veth, routes, nftables rules, its API port) lives in a network
# namespace of the demo's own, `metald-demo`, so nothing touches the machine's own network; the
# curl calls run in it too.
#
# Environment: GUEST_DIR (guest image, default target/guest), METALD_DEMO_DIR (data dir, default
# /tmp/metald-demo, wiped first), UNKEY_METALD_PORT (default 8080), METALD_DEMO_KEEP=1 to leave
# metald and the VM running at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

guest=${GUEST_DIR:-$PWD/target/guest}
data=${METALD_DEMO_DIR:-/tmp/metald-demo}
port=${UNKEY_METALD_PORT:-8080}
api=http://127.0.0.1:$port
auth="Authorization: Bearer dev_customer_test"
metald=target/debug/metald

ns="metald-demo"
in_ns() { nsenter --net=/run/netns/$ns -- "$@"; }
curl_bin=$(command -v curl)
curl() { in_ns "$curl_bin" "$@"; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
field() { sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p" | head -1; }

# Removes what an earlier (interrupted) demo left: metald, VMMs, namespace pins, cgroups, the
# namespace.
teardown() {
	local old
	old=$(cat "$data/metald.pid" 2>/dev/null || true)
	# Only if that pid is still a metald (pids get reused).
	if [ -n "$old" ] && [ "$(readlink "/proc/$old/exe" 2>/dev/null)" = "$(readlink -f "$metald")" ]; then
		kill -KILL "$old" 2>/dev/null || true
	fi
	pkill -KILL -f -- "$data/" 2>/dev/null || true
	for f in "$data"/run/netns/*; do [ -e "$f" ] && umount -l "$f" 2>/dev/null; done
	# Every hierarchy metald makes its parent in (v2, or v1 with the accounting ones).
	for c in /sys/fs/cgroup/metald-demo /sys/fs/cgroup/{cpu,memory,pids,cpuacct,blkio}/metald-demo; do
		[ -d "$c" ] && find "$c" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
		[ -d "$c" ] && rmdir "$c" 2>/dev/null
	done
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$data"
	return 0
}
teardown
ip netns add "$ns"
ip -n "$ns" link set lo up
export UNKEY_METALD_DATA_DIR=$data UNKEY_METALD_PORT=$port UNKEY_METALD_LOG_FORMAT=text \
	UNKEY_METALD_JAILER_CHROOT_DIR=$data/jail UNKEY_METALD_RUN_DIR=$data/run \
	UNKEY_METALD_CGROUP_PARENT=metald-demo UNKEY_METALD_IPV4_SUBNET=10.213.0.0/24

say "Importing the guest image into metald's asset store ($data/assets)"
$metald assets import --id initrd-6.1 --kind initrd --file "$guest/initrd.img"
$metald assets import --id vmlinux-6.1 --kind kernel --file "$guest/vmlinux" --initrd initrd-6.1
$metald assets import --id busybox-rootfs --kind rootfs --file "$guest/rootfs.ext4" --ready-marker METALD_GUEST_READY
$metald assets list

say "Starting metald on 127.0.0.1:$port in network namespace $ns (log: $data/metald.log)"
# nsenter execs metald, so $! is metald itself (a backgrounded shell function would be a
# subshell, and killing it would leave metald running).
nsenter --net=/run/netns/$ns -- "$metald" >"$data/metald.log" 2>&1 &
pid=$!
echo "$pid" >"$data/metald.pid"
cleanup() {
	if [ "${METALD_DEMO_KEEP:-0}" != 1 ]; then
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		teardown
	fi
}
trap cleanup EXIT
for _ in $(seq 100); do
	curl -fs "$api/healthz" >/dev/null && break
	kill -0 "$pid" 2>/dev/null || { cat "$data/metald.log"; exit 1; }
	sleep 0.1
done
grep -E "backend auto|using (qemu|firecracker)|jailer ready|network ready" "$data/metald.log" | sed 's/^/  /'

say "POST /v1/vms (the README's request)"
created=$(curl -fsS -X POST "$api/v1/vms" -H "$auth" -H "Content-Type: application/json" \
	-d '{"config": {"cpu": {"vcpu_count": 2}, "memory": {"size_bytes": 1073741824},
	     "kernel": {"image_id": "vmlinux-6.1"}, "rootfs": {"image_id": "busybox-rootfs"}}}')
echo "$created"
id=$(echo "$created" | field vmId)

say "POST /v1/vms/$id/boot"
start=$(date +%s.%N)
curl -fsS -X POST "$api/v1/vms/$id/boot" -H "$auth"
echo
for _ in $(seq 600); do
	info=$(curl -fsS "$api/v1/vms/$id" -H "$auth")
	echo "$info" | grep -q '"guestReady": *true' && break
	echo "$info" | grep -q VM_STATE_FAILED && { echo "$info"; exit 1; }
	sleep 0.2
done
echo "$info" | grep -q '"guestReady": *true' || { echo "guest not ready: $info"; exit 1; }
printf 'guest ready %.1f s after BootVm\n' "$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo 0)"

say "GET /v1/vms/$id/console (last lines)"
curl -fsS "$api/v1/vms/$id/console?tail_bytes=600" -H "$auth" | sed 's/\\n/\n/g' | tail -6

say "The VMM, seen from outside: its own uid, no capabilities, its own root and namespace"
vmm=$(echo "$info" | field vmmPid)
grep -E '^(Uid|CapEff|NoNewPrivs):' "/proc/$vmm/status" | sed 's/^/  /'
echo "  root holds: $(find "/proc/$vmm/root/" -mindepth 1 -maxdepth 1 -printf "%f ")"
echo "  netns: $(readlink "/proc/$vmm/ns/net") (metald: $(readlink "/proc/$pid/ns/net"))"
v6=$(echo "$info" | field ipv6Address)
say "Pinging the guest at $v6 from metald's namespace"
in_ns ping -c 2 -W 5 "$v6" | tail -2

for action in pause resume; do
	say "POST /v1/vms/$id/$action"
	curl -fsS -X POST "$api/v1/vms/$id/$action" -H "$auth" | field state
done

say "GET /v1/vms"
curl -fsS "$api/v1/vms" -H "$auth" | head -c 400
echo

if [ "${METALD_DEMO_KEEP:-0}" = 1 ]; then
	say "Leaving metald (pid $pid) and $id running. Try: target/debug/metaldctl --token dev_customer_test list"
	exit 0
fi

say "POST /v1/vms/$id/shutdown (Ctrl-Alt-Del, guest shuts down cleanly)"
curl -fsS -X POST "$api/v1/vms/$id/shutdown" -H "$auth" | field state

say "DELETE /v1/vms/$id"
curl -fsS -X DELETE "$api/v1/vms/$id" -H "$auth"
echo
test ! -e "$data/vms/$id" && echo "VM directory, disk, console and socket removed"
say "Done: a real VM booted and was driven through metald's API."
