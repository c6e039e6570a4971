#!/usr/bin/env bash
# The dysco-migrate demo: a lab (client1 → fw1 → server1, with fw2 standing by), a 50 MB download through the
# chain with a checksum check, fw1's conntrack entry and firewall counters, goodput, and the agent's session
# table on fw1. The lab is always removed at the end (also on errors and Ctrl-C).
#
# Usage: scripts/demo.sh            (as root; builds the release binary if it is missing)
# Env:   DYSCO_BIN=path             use this dysco-migrate binary instead of building one
#        DEMO_LAB=name              lab name (default: demo)
#        DEMO_SIZE_MB=50            size of the downloaded file
set -euo pipefail

cd "$(dirname "$0")/.."
LAB="${DEMO_LAB:-demo}"
SIZE_MB="${DEMO_SIZE_MB:-50}"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, iptables)" >&2
  exit 1
fi

BIN="${DYSCO_BIN:-}"
if [ -z "$BIN" ]; then
  BIN=.build/release/dysco-migrate
  if [ ! -x "$BIN" ]; then
    echo "== building the release binary (swift build -c release)"
    swift build -c release
  fi
fi

step() { printf '\n== %s\n' "$*"; }

cleanup() {
  status=$?
  step "lab down"
  "$BIN" lab down --name "$LAB" || true
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "lab up --name $LAB"
"$BIN" lab up --name "$LAB"

LABDIR="/run/dysco-migrate/labs/$LAB"
ROOT="$LABDIR/www"
SERVER=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(next(h["address"] for h in s["hosts"] if h["name"]=="server1"))' "$LABDIR/lab.json")

step "writing a ${SIZE_MB} MB random file into the lab's HTTP root ($ROOT)"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > "$ROOT/blob.bin"
WANT=$(sha256sum "$ROOT/blob.bin" | cut -d' ' -f1)
echo "sha256 $WANT"

step "client1 downloads http://$SERVER/blob.bin through the chain (fw1)"
OUT=$(mktemp /tmp/dysco-demo.XXXXXX)
STATS=$(ip netns exec "$LAB-client1" curl -sS --fail -m 120 -o "$OUT" \
  -w '%{size_download} %{time_total} %{speed_download}' "http://$SERVER/blob.bin")
read -r BYTES SECONDS_TOTAL SPEED <<<"$STATS"
GOT=$(sha256sum "$OUT" | cut -d' ' -f1)
rm -f "$OUT"
echo "received $BYTES bytes in ${SECONDS_TOTAL}s"
if [ "$GOT" = "$WANT" ]; then
  echo "sha256 matches: $GOT"
else
  echo "sha256 MISMATCH: got $GOT, want $WANT" >&2
  exit 1
fi
python3 -c 'import sys; print("goodput: %.1f Mbit/s" % (float(sys.argv[1]) * 8 / 1e6))' "$SPEED"

step "fw1's conntrack entries (the client→server session as the firewall sees it)"
ip netns exec "$LAB-fw1" conntrack -L -p tcp 2>&1 || true

step "firewall counters"
"$BIN" lab status --name "$LAB"

step "dysco-migrate sessions --netns $LAB-fw1"
"$BIN" sessions --netns "$LAB-fw1" || echo "(sessions command failed)"
