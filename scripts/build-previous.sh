#!/usr/bin/env bash
# Builds the previous release's agent (`make previous`) for the rolling-upgrade test (IntegrationTests.RollingUpgradeTests,
# docs/CONTROL-PROTOCOL.md "Versions"): the tree of release $1 at commit $2 (main's history; tags do not travel with
# every clone, so the release is pinned by its commit) exported with `git archive` into .build/previous/src, its
# dysco-migrate built there (release, static Swift runtime) with its own BPF programs, both copied to
# .build/previous/bin/ (the agent looks for dysco.bpf.o beside its binary). The build must report version $1.
# Idempotent: a build of the same commit is kept. A shallow clone is deepened from its origin when the commit is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=${1:?usage: build-previous.sh VERSION COMMIT}
COMMIT=${2:?usage: build-previous.sh VERSION COMMIT}
SWIFT=${SWIFT:-swift}
OUT=.build/previous
have_commit() { git cat-file -e "$COMMIT^{commit}" 2>/dev/null; }
if ! have_commit && [ "$(git rev-parse --is-shallow-repository 2>/dev/null)" = true ]; then
    echo "build-previous: $COMMIT is not in this shallow clone; fetching the history from origin" >&2
    git fetch -q --unshallow origin || true
fi
if ! have_commit; then
    echo "build-previous: release $RELEASE's commit $COMMIT is not in this repository's history" \
         "(a clone of main holds it; a shallow clone needs 'git fetch --unshallow')" >&2
    exit 1
fi
if [ -x "$OUT/bin/dysco-migrate" ] && [ "$(cat "$OUT/bin/COMMIT" 2>/dev/null)" = "$COMMIT" ]; then
    echo "build-previous: $RELEASE ($COMMIT) already built: $OUT/bin/dysco-migrate"
    exit 0
fi
rm -rf "$OUT/src" "$OUT/bin"
mkdir -p "$OUT/src" "$OUT/bin"
git archive "$COMMIT" | tar -x -C "$OUT/src"
make -C "$OUT/src" bpf
(cd "$OUT/src" && "$SWIFT" build -c release --static-swift-stdlib --product dysco-migrate)
BUILT=$("$OUT/src/.build/release/dysco-migrate" --version)
case "$BUILT" in
    *"$RELEASE"*) ;;
    *) echo "build-previous: commit $COMMIT reports version '$BUILT', not $RELEASE" >&2; exit 1 ;;
esac
cp "$OUT/src/.build/release/dysco-migrate" "$OUT/src/.build/bpf/dysco.bpf.o" "$OUT/bin/"
echo "$COMMIT" > "$OUT/bin/COMMIT"
echo "build-previous: $RELEASE ($COMMIT): $BUILT in $OUT/bin/"
