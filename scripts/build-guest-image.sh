#!/usr/bin/env bash
# Build the guest boot artefacts metald uses for tests and local runs:
#
#   vmlinuz      Debian cloud kernel (bzImage) for QEMU -kernel
#   vmlinux      the same kernel as an uncompressed ELF (PVH entry): Firecracker, and QEMU too
#   initrd.img   gzip'd newc cpio: busybox-static + virtio modules; /init mounts /dev/vda and
#                switch_roots into it
#   rootfs.ext4  small sparse ext4 image: busybox init, sets up eth0 from the kernel command line,
#                prints one "METALD_GUEST_READY ..." line on the console when booted, reboots
#                (-> VMM exits) on Ctrl-Alt-Del, powers off on the ACPI power button; optionally
#                pings targets in a loop and runs a shell script from an extra drive
#   manifest.txt kernel package + version, sizes and sha256 of the files above
#
# Usage: scripts/build-guest-image.sh [OUT_DIR]        (default OUT_DIR: ./target/guest)
#
# Runs as root on Debian 12 (bookworm). Missing tools are installed with apt-get; the kernel and,
# when needed, busybox-static are only downloaded and unpacked (never installed on the host).
# Nothing is rebuilt when all outputs exist and are newer than this script.
#
# Environment:
#   METALD_GUEST_FORCE=1         rebuild even if the outputs are up to date
#   METALD_GUEST_KERNEL_PKG=...  kernel meta package to resolve (default linux-image-cloud-amd64)
#   METALD_GUEST_ROOTFS_MIB=N    size of rootfs.ext4 in MiB (default 64)
#   METALD_GUEST_CACHE=DIR       where downloaded .debs are kept (default OUT_DIR/.cache)
#   SOURCE_DATE_EPOCH=N          timestamp inside the images (default: the kernel image's mtime
#                                in its .deb, so rebuilds from the same packages are identical)
#
# Guest kernel command line (verified with QEMU q35 + TCG, -kernel vmlinuz or vmlinux):
#   console=ttyS0 root=/dev/vda rw panic=-1
# optional (all verified the same way, eth0 = virtio-net on a TAP):
#   metald.hostname=NAME
#   metald.ip6=ADDR metald.gw6=GW   before the ready line: eth0 up, ADDR/128 on eth0, route GW/128
#                                   dev eth0, default via GW; duplicate address detection is off
#                                   for eth0 (busybox ip has no "nodad") and the ready line waits
#                                   (~3 s at most) until eth0's operstate is up and no address on
#                                   it is tentative
#   metald.ip4=ADDR metald.gw4=GW   the same for IPv4: ADDR/32, route GW/32 dev eth0, default via GW
#                                   (v6 and v4 each optional, GW too; no eth0: both are ignored)
#   metald.ping=T1,T2,...           after the ready line, in the background: up to 600 rounds, 1 s
#                                   apart, each pinging every target (IPv6 or IPv4 literal) once
#                                   (ping -c 1 -W 1; ping6 for IPv6) and printing one line per target
#   metald.script=/dev/vdX          after the ready line, in the background: sh /dev/vdX (waits up
#                                   to 5 s for the device; stdin /dev/null, stdout+stderr to the
#                                   console line by line), then one exit line; for a raw drive, pad
#                                   the script (e.g. with NULs) to a multiple of 512 bytes and end
#                                   it with "exit"
# Console lines for the host to match (each starts a line and is written with one write()):
#   METALD_GUEST_READY kernel=<uname -r> cpus=N mem_kb=N hostname=H root=/dev/vda net=eth0,..|none uptime_s=S.SS ip6=ADDR|none ip4=ADDR|none
#   METALD_PING round=N target=T result=ok|fail
#   METALD_SCRIPT_EXIT code=N
#   METALD_GUEST_SHUTDOWN reason=ctrlaltdel|powerbutton|shutdown
# (Kernel messages go to the serial port by another path and could still cut into a line.)
set -euo pipefail

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

case "${1:-}" in
-h | --help)
	usage
	exit 0
	;;
-*)
	echo "unknown option: $1" >&2
	usage >&2
	exit 2
	;;
esac
if [ "$#" -gt 1 ]; then
	usage >&2
	exit 2
fi

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
OUT_DIR=${1:-./target/guest}
KERNEL_META_PKG=${METALD_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}
ROOTFS_MIB=${METALD_GUEST_ROOTFS_MIB:-64}
OUTPUTS=(vmlinuz vmlinux initrd.img rootfs.ext4 manifest.txt)
# Load order matters (no modprobe/depmod in the guest). Dependencies found with modinfo are
# added in front of each module automatically; built-in ones are skipped.
#   button + evdev: ACPI power button as an input device, for acpid (QEMU system_powerdown).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio
	virtio_blk failover net_failover virtio_net virtio_rng button evdev)
REQUIRED_MODULES=(virtio_blk)

log() { echo "build-guest-image: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
CACHE_DIR=${METALD_GUEST_CACHE:-$OUT_DIR/.cache}

up_to_date() {
	local f
	[ "${METALD_GUEST_FORCE:-0}" = 1 ] && return 1
	for f in "${OUTPUTS[@]}"; do
		[ -s "$OUT_DIR/$f" ] && [ "$OUT_DIR/$f" -nt "$SCRIPT" ] || return 1
	done
}

if up_to_date; then
	log "up to date: $OUT_DIR (METALD_GUEST_FORCE=1 to rebuild)"
	exit 0
fi

# One build at a time per OUT_DIR (parallel test runs may all call this script).
exec 9>"$OUT_DIR/.lock"
flock 9
if up_to_date; then
	log "up to date: $OUT_DIR (built by a concurrent run)"
	exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, device nodes, file ownership in the images)"

# --- host tools -------------------------------------------------------------------------------

apt_lists_present() {
	compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

APT_UPDATED=0
apt_update() {
	[ "$APT_UPDATED" = 1 ] && return 0
	log "apt-get update"
	apt-get update -qq >&2
	APT_UPDATED=1
}

apt_install() {
	apt_lists_present || apt_update
	log "installing: $*"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2; then
		apt_update
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
	fi
}

# apt-get download into the current directory (as root: no _apt sandbox warning).
apt_download() {
	apt_lists_present || apt_update
	if ! apt-get download -qq -o APT::Sandbox::User=root "$@" >&2; then
		apt_update
		apt-get download -qq -o APT::Sandbox::User=root "$@" >&2
	fi
}

ensure_tools() {
	local pair cmd pkg missing=()
	for pair in cpio:cpio gzip:gzip lz4:lz4 mkfs.ext4:e2fsprogs modinfo:kmod flock:util-linux \
		sha256sum:coreutils od:coreutils grep:grep; do
		cmd=${pair%%:*}
		pkg=${pair#*:}
		command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
		apt_install "${missing[@]}"
	fi
}

# Installs the decompressor for .ko.xz / .ko.zst modules if needed.
ensure_decompressor() {
	case "$1" in
	*.ko.xz) command -v xz >/dev/null 2>&1 || apt_install xz-utils ;;
	*.ko.zst) command -v zstd >/dev/null 2>&1 || apt_install zstd ;;
	esac
}

is_elf() {
	[ -s "$1" ] && [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]
}

ensure_tools
mkdir -p "$CACHE_DIR"
WORK=$(mktemp -d "$OUT_DIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel -----------------------------------------------------------------------------------

apt_lists_present || apt_update
deps=$(apt-cache depends "$KERNEL_META_PKG" 2>/dev/null) || true
KPKG=$(printf '%s\n' "$deps" | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ <>]*\)$/\1/p' | head -n 1)
if [ -z "$KPKG" ]; then
	apt_update
	deps=$(apt-cache depends "$KERNEL_META_PKG") || die "apt-cache depends $KERNEL_META_PKG failed"
	KPKG=$(printf '%s\n' "$deps" | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ <>]*\)$/\1/p' | head -n 1)
fi
[ -n "$KPKG" ] || die "could not resolve the kernel package behind $KERNEL_META_PKG"

# Newest version apt would install; reuse the cached .deb when it is already there.
kver_candidate=$(apt-cache show --no-all-versions "$KPKG" | sed -n 's/^Version: //p' | head -n 1)
[ -n "$kver_candidate" ] || die "no installable version of $KPKG"
KDEB="$CACHE_DIR/${KPKG}_${kver_candidate//:/%3a}_amd64.deb"
if [ ! -s "$KDEB" ]; then
	log "downloading $KPKG $kver_candidate"
	(cd "$CACHE_DIR" && apt_download "$KPKG=$kver_candidate")
	[ -s "$KDEB" ] || die "apt-get download did not produce $KDEB"
fi
KPKG_VERSION=$(dpkg-deb -f "$KDEB" Version)
log "kernel package: $KPKG $KPKG_VERSION"

KROOT="$WORK/kernel"
dpkg-deb -x "$KDEB" "$KROOT"
mapfile -t krels < <(ls "$KROOT/lib/modules")
[ "${#krels[@]}" = 1 ] || die "expected one lib/modules/<version> in $KPKG, found: ${krels[*]:-none}"
KREL=${krels[0]}
MODDIR="$KROOT/lib/modules/$KREL"
[ -s "$KROOT/boot/vmlinuz-$KREL" ] || die "$KPKG has no boot/vmlinuz-$KREL"
cp "$KROOT/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
# (mke2fs treats E2FSPROGS_FAKE_TIME=0 as "now", so never use 0.)
EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$KROOT/boot/vmlinuz-$KREL")}
[ "$EPOCH" -gt 0 ] 2>/dev/null || die "bad SOURCE_DATE_EPOCH: $EPOCH"

# The bzImage payload is LZ4 "legacy" format (magic 02 21 4c 18). lz4 stops with an error at the
# trailer the kernel build appends after the stream; what it wrote before that is the whole ELF.
extract_vmlinux() {
	local img=$1 out=$2 off offsets
	offsets=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$img" | cut -d: -f1) || true
	for off in $offsets; do
		tail -c +"$((off + 1))" "$img" | lz4 -dc >"$out" 2>/dev/null || true
		if is_elf "$out"; then
			return 0
		fi
	done
	rm -f "$out"
	return 1
}
extract_vmlinux "$WORK/vmlinuz" "$WORK/vmlinux" ||
	die "no LZ4 legacy payload that decompresses to an ELF in vmlinuz-$KREL"
[ "$(stat -c %s "$WORK/vmlinux")" -gt $((4 * 1024 * 1024)) ] || die "vmlinux is implausibly small"

# --- busybox-static ---------------------------------------------------------------------------

BUSYBOX=
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)" = "install ok installed" ] &&
	[ -x /bin/busybox ]; then
	BUSYBOX=/bin/busybox
	BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
else
	# Don't install it: busybox-static conflicts with the "busybox" package a host may need.
	bbdeb=$(compgen -G "$CACHE_DIR/busybox-static_*.deb" | sort | tail -n 1 || true)
	if [ -z "$bbdeb" ]; then
		log "downloading busybox-static"
		(cd "$CACHE_DIR" && apt_download busybox-static)
		bbdeb=$(compgen -G "$CACHE_DIR/busybox-static_*.deb" | sort | tail -n 1) ||
			die "apt-get download busybox-static failed"
	fi
	dpkg-deb -x "$bbdeb" "$WORK/bb"
	BUSYBOX="$WORK/bb/bin/busybox"
	BUSYBOX_VERSION=$(dpkg-deb -f "$bbdeb" Version)
fi
[ -x "$BUSYBOX" ] || die "no busybox binary at $BUSYBOX"
# Static = no PT_INTERP (type 3) program header (64-bit little-endian ELF).
elf_has_interp() {
	local f=$1 phoff phentsize phnum i
	phoff=$(od -An -t u8 -j 32 -N 8 "$f" | tr -d ' ')
	phentsize=$(od -An -t u2 -j 54 -N 2 "$f" | tr -d ' ')
	phnum=$(od -An -t u2 -j 56 -N 2 "$f" | tr -d ' ')
	for ((i = 0; i < phnum; i++)); do
		[ "$(od -An -t u4 -j $((phoff + i * phentsize)) -N 4 "$f" | tr -d ' ')" = 3 ] && return 0
	done
	return 1
}
is_elf "$BUSYBOX" || die "$BUSYBOX is not an ELF binary"
if elf_has_interp "$BUSYBOX"; then
	die "$BUSYBOX is dynamically linked; busybox-static is required"
fi
# Applets the initrd and rootfs scripts use, plus what tests run from a metald.script drive.
REQUIRED_APPLETS=(sh awk sed grep cut tr cat printf mount umount switch_root insmod findfs
	hostname uname nproc sync reboot poweroff acpid ip ping ping6 nc dd head sleep seq)
declare -A HAVE_APPLET=()
while read -r a; do
	HAVE_APPLET[$a]=1
done < <("$BUSYBOX" --list)
missing_applets=()
for a in "${REQUIRED_APPLETS[@]}"; do
	[ -n "${HAVE_APPLET[$a]:-}" ] || missing_applets+=("$a")
done
[ "${#missing_applets[@]}" = 0 ] || die "$BUSYBOX lacks applets: ${missing_applets[*]}"

# install_busybox DIR: /bin/busybox plus relative applet symlinks at busybox's own paths.
install_busybox() {
	local root=$1 path dir up
	mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
	cp "$BUSYBOX" "$root/bin/busybox"
	chmod 0755 "$root/bin/busybox"
	while read -r path; do
		case "$path" in
		*/*) ;;
		*) continue ;; # "linuxrc"
		esac
		if [ -e "$root/$path" ] || [ -L "$root/$path" ]; then
			continue
		fi
		dir=${path%/*}
		up=$(printf '%s\n' "$dir" | sed 's:[^/]*:..:g')
		mkdir -p "$root/$dir"
		ln -s "$up/bin/busybox" "$root/$path"
	done < <("$BUSYBOX" --list-full)
}

make_dev_nodes() {
	mkdir -p "$1/dev"
	mknod -m 0600 "$1/dev/console" c 5 1
	mknod -m 0666 "$1/dev/null" c 1 3
}

# --- initrd -----------------------------------------------------------------------------------

declare -A MODFILE=() BUILTIN=()
while read -r f; do
	n=${f##*/}
	n=${n%%.ko*}
	MODFILE[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
if [ -f "$MODDIR/modules.builtin" ]; then
	while read -r f; do
		n=${f##*/}
		n=${n%.ko}
		BUILTIN[${n//-/_}]=1
	done <"$MODDIR/modules.builtin"
fi

ORDER=()
add_module() {
	local name=${1//-/_} dep deps i
	local -a deplist
	for i in "${ORDER[@]}"; do
		[ "$i" = "$name" ] && return 0
	done
	if [ -n "${BUILTIN[$name]:-}" ]; then
		return 0
	fi
	if [ -z "${MODFILE[$name]:-}" ]; then
		log "warning: module $name is neither built in nor shipped in $KPKG; skipped"
		return 0
	fi
	deps=$(modinfo -F depends "${MODFILE[$name]}")
	IFS=, read -r -a deplist <<<"$deps"
	for dep in "${deplist[@]}"; do
		[ -n "$dep" ] && add_module "$dep"
	done
	ORDER+=("$name")
}
for m in "${MODULES[@]}"; do
	add_module "$m"
done
for m in "${REQUIRED_MODULES[@]}"; do
	[ -n "${BUILTIN[$m]:-}" ] || [ -n "${MODFILE[$m]:-}" ] || die "required module $m not available in $KPKG"
done

IR="$WORK/initrd"
install_busybox "$IR"
mkdir -p "$IR/proc" "$IR/sys" "$IR/newroot" "$IR/lib/modules" "$IR/etc"
make_dev_nodes "$IR"
: >"$IR/etc/modules.order"
for m in "${ORDER[@]}"; do
	f=${MODFILE[$m]}
	ensure_decompressor "$f"
	case "$f" in
	*.ko.xz) xz -dc "$f" >"$IR/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -qdc "$f" >"$IR/lib/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$IR/lib/modules/$m.ko" ;;
	*) cp "$f" "$IR/lib/modules/$m.ko" ;;
	esac
	echo "$m" >>"$IR/etc/modules.order"
done
log "initrd modules: ${ORDER[*]}"

cat >"$IR/init" <<'EOF'
#!/bin/sh
# metald initrd: load the virtio drivers, mount the root disk, switch_root into it.
# Kernel command line: root=/dev/vda (or LABEL=/UUID=) rootfstype=ext4 rootflags= ro|rw
# rootdelay=SECONDS init=/sbin/init
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

msg() { echo "initrd: $*" >/dev/console 2>/dev/null || echo "initrd: $*"; }
rescue() {
	msg "$*"
	msg "dropping to a shell"
	exec sh </dev/console >/dev/console 2>&1
}

mount -t devtmpfs devtmpfs /dev 2>/dev/null || [ -c /dev/console ] || rescue "cannot mount devtmpfs on /dev"
mount -t proc proc /proc || rescue "cannot mount /proc"
mount -t sysfs sysfs /sys || rescue "cannot mount /sys"

root=/dev/vda fstype=ext4 flags='' mode=rw init=/sbin/init delay=5
read -r cmdline </proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	root=*) root=${arg#root=} ;;
	rootfstype=*) fstype=${arg#rootfstype=} ;;
	rootflags=*) flags=${arg#rootflags=} ;;
	rootdelay=*) delay=${arg#rootdelay=} ;;
	init=*) init=${arg#init=} ;;
	ro) mode=ro ;;
	rw) mode=rw ;;
	esac
done

while read -r m; do
	[ -f "/lib/modules/$m.ko" ] || continue
	grep -q "^$m " /proc/modules && continue
	out=$(insmod "/lib/modules/$m.ko" 2>&1) || case "$out" in
		*"File exists"*) ;;
		*) msg "warning: insmod $m: $out" ;;
	esac
done </etc/modules.order

dev=
tries=$((delay * 10))
while :; do
	case "$root" in
	LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) || dev= ;;
	*) dev=$root ;;
	esac
	[ -n "$dev" ] && [ -b "$dev" ] && break
	tries=$((tries - 1))
	[ "$tries" -gt 0 ] || rescue "root device $root did not appear within ${delay}s (loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ' | sed 's/ $//'))"
	sleep 0.1
done

mount -t "$fstype" -o "$mode${flags:+,$flags}" "$dev" /newroot || rescue "cannot mount $dev ($fstype,$mode) on /newroot"
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || rescue "$init not found on $dev"
for d in dev proc sys; do
	[ -d "/newroot/$d" ] || rescue "/$d missing on $dev"
done
mount --move /dev /newroot/dev || rescue "cannot move /dev to the new root"
mount --move /proc /newroot/proc || rescue "cannot move /proc to the new root"
mount --move /sys /newroot/sys || rescue "cannot move /sys to the new root"
exec switch_root /newroot "$init"
EOF
chmod 0755 "$IR/init"

# --- rootfs -----------------------------------------------------------------------------------

RF="$WORK/rootfs"
install_busybox "$RF"
mkdir -p "$RF"/{proc,sys,tmp,run,root,mnt,var/log,etc/init.d,etc/acpi/PWRF}
chmod 1777 "$RF/tmp"
chmod 0700 "$RF/root"
make_dev_nodes "$RF"
ln -s ../run "$RF/var/run"

echo metald-guest >"$RF/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$RF/etc/hosts"
echo 'root::0:0:root:/root:/bin/sh' >"$RF/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$RF/etc/group"
: >"$RF/etc/fstab"

cat >"$RF/etc/inittab" <<'EOF'
# metald guest (busybox init)
::sysinit:/etc/init.d/rcS
# Keeps init busy with something harmless; there is no login on the console.
::respawn:/bin/sh -c 'while true; do sleep 3600; done'
# The host asks for shutdown with Ctrl-Alt-Del. The VMM runs with -no-reboot (QEMU) or exits on
# reboot (Firecracker), so rebooting ends the VMM process.
# (busybox init merges entries with the same command text, so the rcK lines differ in arguments.)
::ctrlaltdel:/etc/init.d/rcK ctrlaltdel
::ctrlaltdel:/sbin/reboot -f
::shutdown:/etc/init.d/rcK shutdown
EOF

cat >"$RF/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# metald guest system start: mounts, hostname, static network from the kernel command line, then
# one METALD_GUEST_READY line on the console; after it, in the background, the metald.ping loop
# and the metald.script drive. Command line and console lines: scripts/build-guest-image.sh.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# (Debian's busybox has no "mountpoint" applet.) The initrd normally hands over /dev /proc /sys.
mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }
[ -e /proc/mounts ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=0620 devpts /dev/pts
mounted /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mounted /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run

# say LINE: one line to /dev/console, which is the last console= on the kernel command line, and
# to the serial port too when that is not the same. Each copy is a single write(), and the tty
# layer never splits one write, so lines from the ping loop and the script never mix mid-line.
also=''
active=$(cat /sys/class/tty/console/active 2>/dev/null)
if [ "${active##* }" != ttyS0 ] && [ -c /dev/ttyS0 ]; then
	also=/dev/ttyS0
fi
say() {
	printf '%s\n' "$1" >/dev/console
	[ -z "$also" ] || printf '%s\n' "$1" >"$also" 2>/dev/null
}

name='' ip6='' gw6='' ip4='' gw4='' ping='' script=''
read -r cmdline </proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	metald.hostname=*) name=${arg#metald.hostname=} ;;
	metald.ip6=*) ip6=${arg#metald.ip6=} ;;
	metald.gw6=*) gw6=${arg#metald.gw6=} ;;
	metald.ip4=*) ip4=${arg#metald.ip4=} ;;
	metald.gw4=*) gw4=${arg#metald.gw4=} ;;
	metald.ping=*) ping=${arg#metald.ping=} ;;
	metald.script=*) script=${arg#metald.script=} ;;
	esac
done
if [ -n "$name" ]; then hostname "$name"; else hostname -F /etc/hostname; fi
ip link set lo up 2>/dev/null

# Static addresses on eth0: <ip6>/128 and <ip4>/32, an on-link host route to each gateway (the
# host end of the TAP) and the default routes through them. Done before the ready line.
ip6_set='' ip4_set=''
ip6=${ip6%%/*}
ip4=${ip4%%/*}
if [ -n "$ip6$ip4" ] && [ ! -e /sys/class/net/eth0 ]; then
	say "metald: no eth0: metald.ip6/metald.ip4 ignored"
elif [ -n "$ip6$ip4" ]; then
	# The host hands out the addresses: no duplicate address detection (busybox ip has no
	# "nodad"), so the v6 addresses are usable at once instead of "tentative" for ~1-2 s.
	echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad 2>/dev/null
	ip link set eth0 up
	if [ -n "$ip6" ] && ip -6 addr add "$ip6/128" dev eth0; then
		ip6_set=$ip6
		if [ -n "$gw6" ]; then
			ip -6 route add "$gw6/128" dev eth0 && ip -6 route add default via "$gw6" dev eth0
		fi
	fi
	if [ -n "$ip4" ] && ip addr add "$ip4/32" dev eth0; then
		ip4_set=$ip4
		if [ -n "$gw4" ]; then
			ip route add "$gw4/32" dev eth0 && ip route add default via "$gw4" dev eth0
		fi
	fi
	# Wait (60 polls 50 ms apart, ~3 s at most) until no eth0 address is tentative (flag 0x40 in
	# if_inet6; in case DAD could not be turned off) and the kernel has seen the link come up
	# (operstate up, or unknown for a driver that doesn't report it). Traffic would flow before
	# the latter, but the kernel's "eth0: link becomes ready" line would then come after the
	# ready line, up to ~1 s late (link events are rate-limited), and could cut into our lines.
	i=0
	while :; do
		read -r state </sys/class/net/eth0/operstate
		case "$state" in
		up | unknown)
			[ -z "$ip6_set" ] && break
			awk '$6 == "eth0" && $5 ~ /^[4-7c-f]/ { t = 1 } END { exit !t }' /proc/net/if_inet6 || break
			;;
		esac
		i=$((i + 1))
		if [ "$i" -gt 60 ]; then
			say "metald: eth0 not ready after 3 s (operstate $state)"
			break
		fi
		sleep 0.05
	done
fi

# ACPI power button (QEMU system_powerdown) -> /etc/acpi/PWRF/00000080
if [ -d /dev/input ]; then
	acpid -c /etc/acpi -a /etc/acpid.conf -l /run/acpid.log -p /run/acpid.pid
fi

mem_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
nics=''
for n in /sys/class/net/*; do
	n=${n##*/}
	[ "$n" = lo ] || [ "$n" = '*' ] || nics="$nics${nics:+,}$n"
done
root=$(awk '$2 == "/" && $1 != "rootfs" { d = $1 } END { print d }' /proc/mounts)
up=$(cut -d' ' -f1 /proc/uptime)
say "METALD_GUEST_READY kernel=$(uname -r) cpus=$(nproc) mem_kb=$mem_kb hostname=$(hostname) root=$root net=${nics:-none} uptime_s=$up ip6=${ip6_set:-none} ip4=${ip4_set:-none}"

# metald.ping=T1,T2,...: up to 600 rounds, 1 s apart; each pings every target once.
if [ -n "$ping" ]; then
	(
		targets=$(printf '%s\n' "$ping" | tr ',' ' ')
		n=1
		while [ "$n" -le 600 ]; do
			for t in $targets; do
				case "$t" in
				*:*) p=ping6 ;;
				*) p=ping ;;
				esac
				if "$p" -c 1 -W 1 "$t" >/dev/null 2>&1; then r=ok; else r=fail; fi
				say "METALD_PING round=$n target=$t result=$r"
			done
			n=$((n + 1))
			sleep 1
		done
	) </dev/null >/dev/null 2>&1 &
fi

# metald.script=/dev/vdX: "sh /dev/vdX", its output line by line to the console (so a partial
# line of it can't swallow the start of a METALD_PING line), then METALD_SCRIPT_EXIT code=N.
# The exit line travels through the same pipe behind the script's output, after a \001 that
# tells it from the script's own lines; processes the script leaves running don't delay it.
if [ -n "$script" ]; then
	(
		soh=$(printf '\001')
		i=0
		while [ ! -e "$script" ] && [ "$i" -lt 50 ]; do
			i=$((i + 1))
			sleep 0.1
		done
		{
			sh "$script" </dev/null 2>&1
			printf '\001METALD_SCRIPT_EXIT code=%s\n' "$?"
		} | while IFS= read -r l || [ -n "$l" ]; do
			case "$l" in
			*"$soh"METALD_SCRIPT_EXIT\ *)
				[ -z "${l%%"$soh"*}" ] || say "${l%%"$soh"*}"
				say "${l#*"$soh"}"
				;;
			*) say "$l" ;;
			esac
		done
	) </dev/null >/dev/null 2>&1 &
fi
exit 0
EOF

cat >"$RF/etc/init.d/rcK" <<'EOF'
#!/bin/sh
# metald guest shutdown: flush and make the root file system clean before reboot/poweroff.
# $1: why (ctrlaltdel, powerbutton, shutdown).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo "METALD_GUEST_SHUTDOWN reason=${1:-unknown}" >/dev/console 2>/dev/null
sync
umount -a -r 2>/dev/null
mount -o remount,ro / 2>/dev/null
sync
exit 0
EOF

echo 'PWRF PWRF/00000080' >"$RF/etc/acpid.conf"
cat >"$RF/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# ACPI power button: clean up and power off now (the VMM exits on poweroff).
/etc/init.d/rcK powerbutton
exec /sbin/poweroff -f
EOF
chmod 0755 "$RF/etc/init.d/rcS" "$RF/etc/init.d/rcK" "$RF/etc/acpi/PWRF/00000080"

# --- pack -------------------------------------------------------------------------------------

find "$IR" "$RF" -exec touch -h -d "@$EPOCH" {} +

(cd "$IR" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
	gzip -9 -n >"$WORK/initrd.img"

rm -f "$WORK/rootfs.ext4"
truncate -s "${ROOTFS_MIB}M" "$WORK/rootfs.ext4"
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -L metald-root -m 0 \
	-U 6d657461-6c64-4775-8573-74726f6f7466 \
	-E root_owner=0:0,hash_seed=6d657461-6c64-4861-8173-68736565640a \
	-d "$RF" "$WORK/rootfs.ext4"
# mke2fs -d copies each file's ctime, which touch cannot set: pin those too.
(cd "$RF" && find . -mindepth 1 -printf 'sif "/%P" ctime @%T@\n') | sed 's/\.[0-9]*$//' >"$WORK/ctime.cmds"
dbg_err=$(E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$WORK/ctime.cmds" "$WORK/rootfs.ext4" 2>&1 >/dev/null |
	grep -v '^debugfs [0-9.]* (') || true
[ -z "$dbg_err" ] || die "debugfs could not set inode times in rootfs.ext4: $dbg_err"

# --- publish ----------------------------------------------------------------------------------

for f in vmlinuz vmlinux initrd.img rootfs.ext4; do
	chmod 0644 "$WORK/$f"
	mv -f "$WORK/$f" "$OUT_DIR/$f"
done

{
	echo "# metald guest image, built by scripts/build-guest-image.sh"
	echo "kernel_meta_package=$KERNEL_META_PKG"
	echo "kernel_package=$KPKG"
	echo "kernel_package_version=$KPKG_VERSION"
	echo "kernel_release=$KREL"
	echo "busybox_static_version=$BUSYBOX_VERSION"
	echo "initrd_modules=${ORDER[*]}"
	echo "rootfs_size_mib=$ROOTFS_MIB"
	echo "cmdline=console=ttyS0 root=/dev/vda rw panic=-1"
	echo "ready_marker=METALD_GUEST_READY"
	echo "# file <name> <size-bytes> <sha256>"
	for f in vmlinuz vmlinux initrd.img rootfs.ext4; do
		echo "file $f $(stat -c %s "$OUT_DIR/$f") $(sha256sum "$OUT_DIR/$f" | cut -d' ' -f1)"
	done
} >"$WORK/manifest.txt"
mv -f "$WORK/manifest.txt" "$OUT_DIR/manifest.txt"

log "done: $OUT_DIR ($KPKG $KPKG_VERSION)"
