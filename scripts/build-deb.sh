#!/usr/bin/env bash
# Builds the Debian package of dysco-migrate (`make deb`): .build/deb/dysco-migrate_<version>_<arch>.deb.
#
#   /usr/lib/dysco-migrate/dysco-migrate          the release binary (Swift runtime linked statically), with the
#   /usr/lib/dysco-migrate/*.resources            resource bundles it opens beside itself (Bundle.main resolves
#   /usr/bin/dysco-migrate -> ../lib/...          the /usr/bin symlink through /proc/self/exe)
#   /usr/lib/dysco-migrate/dysco.bpf.o            the BPF datapath's tc programs (`make bpf`; agent --datapath bpf
#                                                 finds them beside the binary)
#   /lib/systemd/system/dysco-migrate-agent.service, dysco-migrate-agent@.service
#   /usr/lib/tmpfiles.d/dysco-migrate.conf        /run/dysco-migrate (sockets, journals), /var/lib/dysco-migrate
#   /etc/dysco-migrate/agent.conf                 the agent's arguments (conffile)
#   /usr/share/man/man1/dysco-migrate*.1.gz       from the argument parser (swift-argument-parser's generate-manual)
#   bash, zsh and fish completions                from `dysco-migrate --generate-completion-script`
#
# Depends: dpkg-shlibdeps on the binary (libnetfilter-queue1, libnetfilter-conntrack3, libnftables1, libbpf1, …)
# plus the programs the agent runs (iptables, iproute2). Then lintian (LINTIAN=0 skips it) and, when systemd is
# here, `systemd-analyze verify` on the units. dysco-bench is not packaged: the benchmarks build labs of network
# namespaces and need the test tools (scapy, iperf3); they belong to a build tree, not to a host.
set -euo pipefail
cd "$(dirname "$0")/.."
SWIFT=${SWIFT:-swift}
OUT=${DEB_OUT:-.build/deb}
VERSION=$(sed -n 's/.*static let string = "\(.*\)".*/\1/p' Sources/DyscoCore/Version.swift)
[ -n "$VERSION" ] || { echo "build-deb: no version in Sources/DyscoCore/Version.swift" >&2; exit 1; }
ARCH=$(dpkg --print-architecture)
ROOT="$OUT/root"
DEB="$OUT/dysco-migrate_${VERSION}_${ARCH}.deb"
SRC=packaging/debian

# 1. The release binary with the Swift runtime and Foundation linked in (a Debian host has no Swift toolchain). The
#    flag changes how every Swift module is compiled, so `make release` builds with it too: both share .build/release
#    and neither rebuilds the other's.
"$SWIFT" build -c release --product dysco-migrate --static-swift-stdlib
BIN_DIR=$("$SWIFT" build -c release --show-bin-path)
BIN="$BIN_DIR/dysco-migrate"
if ldd "$BIN" | grep -q 'libswift\|libFoundation'; then
  echo "build-deb: $BIN still links the Swift runtime dynamically:" >&2; ldd "$BIN" >&2; exit 1
fi
# The man pages' generator (the tool behind `swift package plugin generate-manual`, built from the local copy of
# swift-argument-parser).
"$SWIFT" build -c release --product generate-manual

rm -rf "$OUT/root" "$OUT/shlibs"
install -d "$ROOT/DEBIAN" "$ROOT/usr/lib/dysco-migrate" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" \
  "$ROOT/usr/lib/tmpfiles.d" "$ROOT/etc/dysco-migrate" "$ROOT/usr/share/man/man1" \
  "$ROOT/usr/share/doc/dysco-migrate" "$ROOT/usr/share/bash-completion/completions" \
  "$ROOT/usr/share/zsh/vendor-completions" "$ROOT/usr/share/fish/vendor_completions.d"

# 2. Binary and the resource bundles it names (SwiftPM's accessor looks for <package>_<target>.resources beside it).
install -m 0755 "$BIN" "$ROOT/usr/lib/dysco-migrate/dysco-migrate"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$ROOT/usr/lib/dysco-migrate/dysco-migrate"
for bundle in $(grep -ao 'dysco-migrate_[A-Za-z0-9]*\.resources' "$BIN" | sort -u); do
  [ -d "$BIN_DIR/$bundle" ] || { echo "build-deb: $BIN names $bundle, which is not in $BIN_DIR" >&2; exit 1; }
  cp -r "$BIN_DIR/$bundle" "$ROOT/usr/lib/dysco-migrate/"
done
find "$ROOT/usr/lib/dysco-migrate" -name '*.resources' -type d -exec chmod 0755 {} + -o -type f -name '*.py' -exec chmod 0644 {} +
ln -s ../lib/dysco-migrate/dysco-migrate "$ROOT/usr/bin/dysco-migrate"
# The BPF datapath's programs, compiled from bpf/dysco.bpf.c (BPF bytecode: the same file on every architecture).
BPF_OBJ=${BPF_OBJ:-.build/bpf/dysco.bpf.o}
[ -f "$BPF_OBJ" ] || make --no-print-directory bpf
install -m 0644 "$BPF_OBJ" "$ROOT/usr/lib/dysco-migrate/dysco.bpf.o"
# lintian takes BPF bytecode for a binary of another architecture: the package says why it is not (its override).
install -d "$ROOT/usr/share/lintian/overrides"
install -m 0644 "$SRC/lintian-overrides" "$ROOT/usr/share/lintian/overrides/dysco-migrate"

# 3. Units, runtime directories, configuration.
install -m 0644 "$SRC/dysco-migrate-agent.service" "$SRC/dysco-migrate-agent@.service" "$ROOT/lib/systemd/system/"
install -m 0644 "$SRC/tmpfiles.conf" "$ROOT/usr/lib/tmpfiles.d/dysco-migrate.conf"
install -m 0644 "$SRC/agent.conf" "$ROOT/etc/dysco-migrate/agent.conf"
echo /etc/dysco-migrate/agent.conf > "$ROOT/DEBIAN/conffiles"

# 4. Man pages (one per command: dysco-migrate.1, dysco-migrate.agent.1 → dysco-migrate-agent.1, …) and completions.
MAN_TMP="$OUT/man"
rm -rf "$MAN_TMP"; mkdir -p "$MAN_TMP"
"$BIN_DIR/generate-manual" "$BIN" --multi-page --section 1 --date "$(date -u +%Y-%m-%d)" \
  --authors "the dysco-migrate authors" --output-directory "$MAN_TMP"
for page in "$MAN_TMP"/*.1; do
  name=$(basename "$page" .1 | tr . -)
  # generate-manual names a subcommand's page dysco-migrate.agent; Debian's (and git's) convention is dysco-migrate-agent.
  python3 scripts/fix-manpage.py "$page" "$page.fixed"
  gzip -9n -c "$page.fixed" > "$ROOT/usr/share/man/man1/$name.1.gz"
  chmod 0644 "$ROOT/usr/share/man/man1/$name.1.gz"
done
# (bash-completion sources the file: no #! line.)
"$BIN" --generate-completion-script bash | sed '1{/^#!/d}' > "$ROOT/usr/share/bash-completion/completions/dysco-migrate"
"$BIN" --generate-completion-script zsh > "$ROOT/usr/share/zsh/vendor-completions/_dysco-migrate"
"$BIN" --generate-completion-script fish > "$ROOT/usr/share/fish/vendor_completions.d/dysco-migrate.fish"

# 5. Documentation, maintainer scripts.
install -m 0644 "$SRC/copyright" "$ROOT/usr/share/doc/dysco-migrate/copyright"
sed -e "s/@VERSION@/$VERSION/" -e "s/@DATE@/$(date -u -R)/" "$SRC/changelog.in" \
  | gzip -9n > "$ROOT/usr/share/doc/dysco-migrate/changelog.gz"
chmod 0644 "$ROOT/usr/share/doc/dysco-migrate/changelog.gz"
install -m 0755 "$SRC/postinst" "$SRC/postrm" "$ROOT/DEBIAN/"

# 6. Depends: the shared libraries the binary needs (dpkg-shlibdeps wants a debian/control beside it).
mkdir -p "$OUT/shlibs/debian"
printf 'Source: dysco-migrate\n\nPackage: dysco-migrate\nArchitecture: any\n' > "$OUT/shlibs/debian/control"
SHLIBS=$(cd "$OUT/shlibs" && dpkg-shlibdeps -O "$OLDPWD/$ROOT/usr/lib/dysco-migrate/dysco-migrate" 2>/dev/null \
  | sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }
DEPENDS="$SHLIBS, iptables, iproute2"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" -e "s/@DEPENDS@/$DEPENDS/" \
  "$SRC/control.in" > "$ROOT/DEBIAN/control"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/conffiles" "$ROOT/DEBIAN/md5sums"

dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "build-deb: $DEB ($(du -h "$DEB" | cut -f1)); Depends: $DEPENDS"

# 7. Checks.
if command -v systemd-analyze >/dev/null; then
  # The units as installed, but with the staged binary and config in place of /usr/bin/dysco-migrate and
  # /etc/dysco-migrate (this host has the package's files only in $ROOT; `--root` would want a whole system there).
  # Man pages: checked in the installed root by the package test. The template is checked through an instance.
  VERIFY="$OUT/verify"
  rm -rf "$VERIFY"; mkdir -p "$VERIFY"
  STAGED=$(cd "$ROOT" && pwd)
  for unit in dysco-migrate-agent.service dysco-migrate-agent@.service; do
    sed -e "s#/usr/bin/dysco-migrate#$STAGED/usr/bin/dysco-migrate#" -e "s#/etc/dysco-migrate/#$STAGED/etc/dysco-migrate/#g" \
      "$ROOT/lib/systemd/system/$unit" > "$VERIFY/${unit/@./@verify.}"
  done
  systemd-analyze verify --man=no "$VERIFY/dysco-migrate-agent.service" "$VERIFY/dysco-migrate-agent@verify.service"
  echo "build-deb: systemd-analyze verify: ok"
fi
if [ "${LINTIAN:-1}" != 0 ]; then
  lintian --fail-on error,warning --suppress-tags-from-file "$SRC/lintian-suppressed" "$DEB"
  echo "build-deb: lintian: ok"
fi
