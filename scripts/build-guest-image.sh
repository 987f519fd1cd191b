#!/usr/bin/env bash
# Build the guest boot artefacts metald uses for tests and local runs:
#
#   vmlinuz      Debian cloud kernel (bzImage) for QEMU -kernel
#   vmlinux      the same kernel as an uncompressed ELF (PVH entry): Firecracker, and QEMU too
#   initrd.img   gzip'd newc cpio: busybox-static + virtio modules + guest/initramfs/init, which
#                mounts /dev/vda and switch_roots into it
#   rootfs.ext4  small sparse ext4 image: busybox-static + guest/rootfs (busybox init and the
#                scripts that set up eth0 from the kernel command line and print the ready line)
#   manifest.txt kernel package + version, sizes and sha256 of the files above
#
# This script only fetches (Debian packages) and packs (cpio, ext4). What the guest does, the
# kernel arguments it reads and the console lines it prints are in guest/ and its README.md, the
# guest contract.
#
# Usage: scripts/build-guest-image.sh [OUT_DIR]        (default OUT_DIR: ./target/guest)
#
# Runs as root on Debian 12 (bookworm). Missing tools are installed with apt-get; the kernel and,
# when needed, busybox-static are only downloaded and unpacked (never installed on the host).
# Nothing is rebuilt when all outputs exist and are newer than this script and the guest files.
#
# Environment:
#   METALD_GUEST_FORCE=1         rebuild even if the outputs are up to date
#   METALD_GUEST_KERNEL_PKG=...  kernel meta package to resolve (default linux-image-cloud-amd64)
#   METALD_GUEST_ROOTFS_MIB=N    size of rootfs.ext4 in MiB (default 64)
#   METALD_GUEST_CACHE=DIR       where downloaded .debs are kept (default OUT_DIR/.cache)
#   SOURCE_DATE_EPOCH=N          timestamp inside the images (default: the kernel image's mtime
#                                in its .deb, so rebuilds from the same packages are identical)
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
# The guest's own files, copied as they are: MODE:PATH under guest/, where initramfs/X goes to
# /X in initrd.img and rootfs/X to /X in rootfs.ext4. Listed in the order they are created,
# which fixes their place in the ext4 directories. Every file under guest/initramfs and
# guest/rootfs must be listed here (checked).
GUEST_SRC=$(cd "$(dirname "$SCRIPT")/../guest" && pwd)
GUEST_FILES=(
	0755:initramfs/init
	0644:rootfs/etc/hostname
	0644:rootfs/etc/hosts
	0644:rootfs/etc/passwd
	0644:rootfs/etc/group
	0644:rootfs/etc/fstab
	0644:rootfs/etc/inittab
	0755:rootfs/etc/init.d/rcS
	0755:rootfs/etc/init.d/rcK
	0644:rootfs/etc/acpid.conf
	0755:rootfs/etc/acpi/PWRF/00000080
)
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
	local f g
	[ "${METALD_GUEST_FORCE:-0}" = 1 ] && return 1
	for f in "${OUTPUTS[@]}"; do
		[ -s "$OUT_DIR/$f" ] && [ "$OUT_DIR/$f" -nt "$SCRIPT" ] || return 1
		for g in "${GUEST_FILES[@]}"; do
			[ "$OUT_DIR/$f" -nt "$GUEST_SRC/${g#*:}" ] || return 1
		done
	done
}

# Every file under guest/initramfs and guest/rootfs is in GUEST_FILES, and every entry exists.
listed=$(printf '%s\n' "${GUEST_FILES[@]#*:}" | LC_ALL=C sort)
found=$(cd "$GUEST_SRC" && find initramfs rootfs ! -type d | LC_ALL=C sort)
[ "$listed" = "$found" ] ||
	die "GUEST_FILES in $SCRIPT and the files in $GUEST_SRC differ:
$(diff <(echo "$listed") <(echo "$found") | grep '^[<>]' || true)"

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

# install_guest_files initramfs|rootfs DIR: the GUEST_FILES under guest/<first argument>/ into
# DIR, each with its mode (DIR's subdirectories exist already).
install_guest_files() {
	local entry mode path
	for entry in "${GUEST_FILES[@]}"; do
		mode=${entry%%:*} path=${entry#*:}
		[[ $path == "$1"/* ]] || continue
		install -m "$mode" "$GUEST_SRC/$path" "$2/${path#"$1"/}"
	done
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

install_guest_files initramfs "$IR"

# --- rootfs -----------------------------------------------------------------------------------

RF="$WORK/rootfs"
install_busybox "$RF"
mkdir -p "$RF"/{proc,sys,tmp,run,root,mnt,var/log,etc/init.d,etc/acpi/PWRF}
chmod 1777 "$RF/tmp"
chmod 0700 "$RF/root"
make_dev_nodes "$RF"
ln -s ../run "$RF/var/run"

install_guest_files rootfs "$RF"

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
