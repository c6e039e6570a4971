#!/usr/bin/env bash
# A fresh Debian 12 root for the package test (Tests/IntegrationTests/PackageTests.swift). Root only.
#
#   deb-root.sh base          print the path of today's cached base root (debootstrap --variant=minbase bookworm,
#                             with the host's suites: bookworm, bookworm-updates, bookworm-security; apt lists
#                             fetched; systemd and man-db added to check the package), building it first if it is
#                             missing; older ones are removed
#   deb-root.sh copy DIR      a private copy of the base at DIR (which must not exist)
#   deb-root.sh run DIR CMD…  CMD inside DIR (chroot) with /proc mounted in a private mount namespace
#                             (unshare): the mount ends with the command, whatever happens, nothing to clean up
#   deb-root.sh apt DIR ARGS… apt-get ARGS in DIR, retried three times (the mirror is over the network)
#
# The base is keyed by date (one debootstrap a day, about a minute or two with deb.debian.org) under
# $DEB_ROOT_CACHE (default /var/cache/dysco-migrate/test-roots).
set -euo pipefail
CACHE=${DEB_ROOT_CACHE:-/var/cache/dysco-migrate/test-roots}
MIRROR=${DEB_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEB_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

run() {
  local dir=$1; shift
  unshare --mount --fork --propagation private /bin/sh -c \
    'mount -t proc proc "$0/proc" && exec chroot "$0" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"' \
    "$dir" "$@"
}

apt() {
  local dir=$1; shift
  local attempt
  for attempt in 1 2 3; do
    if run "$dir" apt-get -q -o Dpkg::Use-Pty=0 "$@"; then return 0; fi
    echo "deb-root: apt-get $* failed (attempt $attempt)" >&2
    sleep $((attempt * 5))
  done
  return 1
}

base() {
  local path="$CACHE/bookworm-minbase-$(date -u +%Y%m%d)"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -e "$path/.complete" ]; then
    rm -rf "$path.tmp"
    debootstrap --variant=minbase bookworm "$path.tmp" "$MIRROR" >&2
    cat > "$path.tmp/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
SOURCES
    cp /etc/resolv.conf "$path.tmp/etc/resolv.conf"
    apt "$path.tmp" update >&2
    apt "$path.tmp" clean >&2
    touch "$path.tmp/.complete"
    rm -rf "$path"
    mv "$path.tmp" "$path"
  fi
  # Not the package's dependencies (the test checks those come with it): what the test uses to check the installed
  # package, systemd (systemd-analyze verify) and man-db (man -w).
  if [ ! -e "$path/.extras-1" ]; then
    apt "$path" install -y --no-install-recommends systemd man-db >&2
    apt "$path" clean >&2
    touch "$path/.extras-1"
  fi
  # Yesterday's roots go.
  find "$CACHE" -mindepth 1 -maxdepth 1 -type d -name 'bookworm-minbase-*' ! -path "$path" -exec rm -rf {} +
  echo "$path"
}

case "${1:-}" in
  base) base ;;
  copy)
    [ $# -eq 2 ] && [ ! -e "$2" ] || { echo "usage: deb-root.sh copy NEW_DIR" >&2; exit 2; }
    src=$(base)
    cp -a "$src" "$2"
    cp /etc/resolv.conf "$2/etc/resolv.conf"
    ;;
  run) shift; run "$@" ;;
  apt) shift; apt "$@" ;;
  *) echo "usage: deb-root.sh base | copy DIR | run DIR CMD... | apt DIR ARGS..." >&2; exit 2 ;;
esac
