# shellcheck shell=bash disable=SC2034 # variables are used by the sourcing scripts
# Shared helpers for the VM test harness scripts in this directory.
# Sourced (not executed) by build-kernel, run, selftests, checkpatch and smoke.

# Bump whenever a change here or in build-kernel/the guest side changes what a
# cached kernel or initramfs would contain: it is part of every cache key, so
# old entries are simply never looked up again.
VM_HARNESS_VERSION=1

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$VM_DIR/../.." && pwd)
PATCH_DIR=$REPO_ROOT/kernel-patches
# Kconfig options that only the series defines: patched (and dev) builds only.
SERIES_CONFIG=$PATCH_DIR/kernel.config
VM_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/uapi-wishes

# The kernel source comes from Debian's linux-source-6.12 package: a fixed,
# signed tarball that CI machines can install without reaching kernel.org.
LINUX_SRC_PKG=linux-source-6.12
LINUX_SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz

log() { printf 'vm: %s\n' "$*" >&2; }
die() { printf 'vm: error: %s\n' "$*" >&2; exit 1; }

# Seconds since the epoch, for the timing lines the scripts print.
now() { date +%s; }

linux_source_version() {
	dpkg-query -W -f='${Version}' "$LINUX_SRC_PKG" 2>/dev/null ||
		die "$LINUX_SRC_PKG is not installed (apt-get install $LINUX_SRC_PKG)"
}

# Print the patches of kernel-patches/series in order, one absolute path per
# line. Blank lines and '#' comments are ignored (quilt's series format).
series_patches() {
	local line
	[ -f "$PATCH_DIR/series" ] || return 0
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%%#*}
		line=$(printf '%s' "$line" | tr -d '[:space:]')
		[ -n "$line" ] || continue
		[ -f "$PATCH_DIR/$line" ] || die "kernel-patches/series lists $line, which does not exist"
		printf '%s\n' "$PATCH_DIR/$line"
	done <"$PATCH_DIR/series"
}

# Same format as series_patches, for kernel-patches/selftests: directories
# under tools/testing/selftests/ that the patches add.
selftest_dirs() {
	local line
	[ -f "$PATCH_DIR/selftests" ] || return 0
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%%#*}
		line=$(printf '%s' "$line" | tr -d '[:space:]')
		[ -n "$line" ] && printf '%s\n' "$line"
	done <"$PATCH_DIR/selftests"
}

# Cache key of a kernel kind (stock|patched): everything that changes the
# bzImage. The compiler version is included because a toolchain upgrade on
# a developer machine should not silently reuse an image built by the old one.
kernel_key() {
	local kind=$1 p
	{
		echo "harness $VM_HARNESS_VERSION"
		echo "kind $kind"
		echo "source $LINUX_SRC_PKG $(linux_source_version)"
		echo "cc $(gcc --version | head -n1)"
		echo "config"
		cat "$VM_DIR/kernel.config"
		if [ "$kind" = patched ]; then
			echo "series config"
			[ -f "$SERIES_CONFIG" ] && cat "$SERIES_CONFIG"
			echo "series"
			[ -f "$PATCH_DIR/series" ] && cat "$PATCH_DIR/series"
			series_patches | while IFS= read -r p; do
				echo "patch ${p##*/} $(sha256sum <"$p" | cut -d' ' -f1)"
			done
		fi
	} | sha256sum | cut -c1-16
}

# Take an exclusive lock for the rest of the calling process's life, so two
# runs on one machine (a developer and a CI run, or parallel test binaries)
# do not build the same thing twice or into each other.
declare -A VM_LOCKS_HELD=()
lock_cache() {
	local name=$1 fd
	[ -n "${VM_LOCKS_HELD[$name]:-}" ] && return 0
	VM_LOCKS_HELD[$name]=1
	mkdir -p "$VM_CACHE/locks"
	exec {fd}>"$VM_CACHE/locks/$name"
	if ! flock -n "$fd"; then
		log "waiting for another process building $name ..."
		flock "$fd"
	fi
}
