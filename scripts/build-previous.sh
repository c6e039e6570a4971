#!/usr/bin/env bash
# Builds the previous release's agent (`make previous`) for the rolling-upgrade test (IntegrationTests.RollingUpgradeTests,
# docs/CONTROL-PROTOCOL.md "Versions"): the tree of tag $1 (default v0.19.0) exported with `git archive` into
# .build/previous/src, its dysco-migrate built there (release, static Swift runtime) with its own BPF programs, both
# copied to .build/previous/bin/ (the agent looks for dysco.bpf.o beside its binary). Idempotent: a build of the same
# tag is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-v0.19.0}
SWIFT=${SWIFT:-swift}
OUT=.build/previous
if ! git rev-parse -q --verify "refs/tags/$TAG" >/dev/null; then
    echo "build-previous: tag $TAG is not in this clone (git fetch --tags)" >&2
    exit 1
fi
COMMIT=$(git rev-parse "$TAG^{commit}")
if [ -x "$OUT/bin/dysco-migrate" ] && [ "$(cat "$OUT/bin/COMMIT" 2>/dev/null)" = "$COMMIT" ]; then
    echo "build-previous: $TAG ($COMMIT) already built: $OUT/bin/dysco-migrate"
    exit 0
fi
rm -rf "$OUT/src" "$OUT/bin"
mkdir -p "$OUT/src" "$OUT/bin"
git archive "$COMMIT" | tar -x -C "$OUT/src"
make -C "$OUT/src" bpf
(cd "$OUT/src" && "$SWIFT" build -c release --static-swift-stdlib --product dysco-migrate)
cp "$OUT/src/.build/release/dysco-migrate" "$OUT/src/.build/bpf/dysco.bpf.o" "$OUT/bin/"
echo "$COMMIT" > "$OUT/bin/COMMIT"
echo "build-previous: $TAG ($COMMIT): $("$OUT/bin/dysco-migrate" --version) in $OUT/bin/"
