#!/usr/bin/env bash
# Installs metald as a systemd service on this machine (run as root):
#   * builds the release binaries (`$CARGO build --release --workspace --bins`; CARGO defaults
#     to cargo) and installs metald and metaldctl to $PREFIX/bin (PREFIX defaults to /usr/local)
#   * creates the system user and group `metald` if missing
#   * creates /var/lib/metald and /srv/jailer (0750 metald:metald) and /etc/metald
#   * copies deploy/metald.env.example to /etc/metald/metald.env if that file does not exist
#     (an existing one is never touched)
#   * installs deploy/systemd/metald.service to /etc/systemd/system/metald.service, checks it
#     with `systemd-analyze verify`, and runs `systemctl daemon-reload` when systemd is running
#     as PID 1. It does not enable or start the service.
# Safe to run again: what is already in place is left alone and reported as unchanged.
#
# DESTDIR=/some/dir stages the files under that directory instead (no root needed): no user is
# created, nothing is chowned and systemctl is not run.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
target_dir=${CARGO_TARGET_DIR:-target}

user=metald
bindir=$PREFIX/bin
data_dir=/var/lib/metald
jailer_dir=/srv/jailer
etc_dir=/etc/metald
env_file=$etc_dir/metald.env
unit_file=/etc/systemd/system/metald.service

log() { echo "install: $*"; }
die() { echo "install: error: $*" >&2; exit 1; }

# True when systemd is the running init (PID 1): the sd_booted(3) test plus PID 1's name.
systemd_is_pid1() {
	[ -d /run/systemd/system ] || return 1
	[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && return 0
	case $(readlink /proc/1/exe 2>/dev/null) in
	*/systemd) return 0 ;;
	esac
	return 1
}

case $PREFIX in
/*) ;;
*) die "PREFIX must be an absolute path, not '$PREFIX'" ;;
esac

staging=false
if [ -n "$DESTDIR" ]; then
	staging=true
	log "staging into DESTDIR=$DESTDIR: skipping user creation, chown and systemctl"
elif [ "$(id -u)" -ne 0 ]; then
	die "must run as root (or set DESTDIR=<dir> to stage the files without installing)"
fi

# put SRC DEST MODE: installs SRC as DEST (atomically, via a temporary file in DEST's directory,
# so a running binary is replaced rather than overwritten) unless DEST already has that content
# and mode.
put() {
	local src=$1 dest=$2 mode=$3
	if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
		log "unchanged: $dest"
		return
	fi
	mkdir -p "$(dirname "$dest")"
	local tmp
	tmp=$(mktemp "$dest.XXXXXX")
	install -m "$mode" "$src" "$tmp"
	mv -f "$tmp" "$dest"
	log "installed: $dest (mode $mode)"
}

# ensure_dir DIR MODE OWNER:GROUP: creates DIR, or corrects its mode and ownership (not when
# staging). Never touches what is inside it.
ensure_dir() {
	local dir=$1 mode=$2 owner=$3 changed=false
	if [ ! -d "$dir" ]; then
		mkdir -p "$dir"
		log "created: $dir"
		changed=true
	fi
	if [ "$(stat -c %a "$dir")" != "${mode#0}" ]; then
		chmod "$mode" "$dir"
		log "mode $mode: $dir"
		changed=true
	fi
	if ! $staging && [ "$(stat -c %U:%G "$dir")" != "$owner" ]; then
		chown "$owner" "$dir"
		log "owner $owner: $dir"
		changed=true
	fi
	$changed || log "unchanged: $dir (mode $mode, owner $(stat -c %U:%G "$dir"))"
}

# 1. Binaries.
command -v "$CARGO" >/dev/null 2>&1 ||
	die "'$CARGO' not found (under sudo, root's PATH may lack ~/.cargo/bin: set CARGO=/path/to/cargo)"
command -v "${PROTOC:-protoc}" >/dev/null 2>&1 ||
	die "'${PROTOC:-protoc}' not found; the build generates the API code with it: run scripts/install-deps.sh (or apt-get install protobuf-compiler, or set PROTOC)"
log "building: $CARGO build --release --workspace --bins"
"$CARGO" build --release --workspace --bins
for bin in metald metald-jail metaldctl; do
	[ -x "$target_dir/release/$bin" ] || die "$target_dir/release/$bin was not built"
	put "$target_dir/release/$bin" "$DESTDIR$bindir/$bin" 0755
done

# 2. User and group.
if $staging; then
	log "skipped (DESTDIR): creating the system user and group $user"
else
	if getent group "$user" >/dev/null; then
		log "unchanged: group $user exists (gid $(getent group "$user" | cut -d: -f3))"
	else
		groupadd --system "$user"
		log "created: system group $user (gid $(getent group "$user" | cut -d: -f3))"
	fi
	if id -u "$user" >/dev/null 2>&1; then
		log "unchanged: user $user exists (uid $(id -u "$user"))"
	else
		nologin=/usr/sbin/nologin
		[ -x "$nologin" ] || nologin=/sbin/nologin
		useradd --system --no-create-home --shell "$nologin" --gid "$user" \
			--home-dir "$data_dir" --comment "metald microVM daemon" "$user"
		log "created: system user $user (uid $(id -u "$user"), shell $nologin, no home directory)"
	fi
fi

# 3. Directories and configuration.
ensure_dir "$DESTDIR$data_dir" 0750 "$user:$user"
ensure_dir "$DESTDIR$jailer_dir" 0750 "$user:$user"
ensure_dir "$DESTDIR$etc_dir" 0750 "root:$user"
if [ -e "$DESTDIR$env_file" ]; then
	if cmp -s deploy/metald.env.example "$DESTDIR$env_file"; then
		log "unchanged: $DESTDIR$env_file"
	else
		log "kept: $DESTDIR$env_file (local settings, never overwritten; deploy/metald.env.example lists every setting)"
	fi
else
	put deploy/metald.env.example "$DESTDIR$env_file" 0640
	$staging || chown "root:$user" "$DESTDIR$env_file"
fi

# 4. The unit, with ExecStart pointing at $PREFIX/bin/metald.
unit_src=deploy/systemd/metald.service
tmp_unit=$(mktemp)
trap 'rm -f "$tmp_unit"' EXIT
sed "s#^ExecStart=/usr/local/bin/metald #ExecStart=$bindir/metald #" "$unit_src" >"$tmp_unit"
grep -q "^ExecStart=$bindir/metald serve\$" "$tmp_unit" ||
	die "$unit_src: expected an 'ExecStart=/usr/local/bin/metald serve' line"
put "$tmp_unit" "$DESTDIR$unit_file" 0644

# 5. Check the installed unit.
if ! command -v systemd-analyze >/dev/null 2>&1; then
	log "SKIP: systemd-analyze is not installed; $DESTDIR$unit_file NOT verified"
elif $staging; then
	# The staged unit's ExecStart names $bindir/metald, which is not installed outside DESTDIR.
	scripts/verify-unit.sh "$DESTDIR$unit_file" | sed 's/^/install: /'
else
	status=0
	out=$(systemd-analyze verify "$unit_file" 2>&1) || status=$?
	if [ "$status" -ne 0 ] || [ -n "$out" ]; then
		[ -z "$out" ] || printf '%s\n' "$out" >&2
		die "systemd-analyze verify $unit_file failed (exit status $status); see above"
	fi
	log "verified: systemd-analyze verify $unit_file (no warnings)"
fi

# 6. Tell systemd.
if $staging; then
	log "skipped (DESTDIR): systemctl daemon-reload"
elif systemd_is_pid1; then
	systemctl daemon-reload
	log "ran: systemctl daemon-reload"
	log "done. Start it with: systemctl enable --now metald (after an upgrade: systemctl restart metald)"
else
	log "systemd is not PID 1 here (PID 1 is '$(cat /proc/1/comm 2>/dev/null || echo unknown)'): skipped systemctl daemon-reload; the unit takes effect on a host booted with systemd"
	log "done."
fi
