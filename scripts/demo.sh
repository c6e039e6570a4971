#!/usr/bin/env bash
# The dysco-migrate demo: swap the firewall under a live download.
# A lab (client1 → fw1 → server1, with fw2 standing by, both strict conntrack firewalls), a 50 MiB download through
# fw1 from a sender-paced server (5 MiB/s: it lasts 10 s), and halfway through `dysco-migrate replace fw1 → fw2`: the session
# moves to fw2 with its conntrack state while it runs. Prints the per-phase latency of the migration, fw2's
# conntrack entry and both firewalls' counters, the byte-exact (sha256) check of the download, and the agents'
# session tables. The lab is always removed at the end (also on errors and Ctrl-C).
#
# Usage: scripts/demo.sh            (as root; builds the release binary if it is missing)
# Env:   DYSCO_BIN=path             use this dysco-migrate binary instead of building one
#        DEMO_LAB=name              lab name (default: demo)
#        DEMO_SUBNET=10.77.0.0/24   the lab's subnet
#        DEMO_SIZE_MB=50            size of the downloaded file, MiB
#        DEMO_RATE_MB=5             the server's pace, MiB/s, so the transfer is live for SIZE/RATE s
set -euo pipefail

cd "$(dirname "$0")/.."
LAB="${DEMO_LAB:-demo}"
SUBNET="${DEMO_SUBNET:-10.77.0.0/24}"
SIZE_MB="${DEMO_SIZE_MB:-50}"
RATE_MB="${DEMO_RATE_MB:-5}"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, iptables)" >&2
  exit 1
fi

BIN="${DYSCO_BIN:-}"
if [ -z "$BIN" ]; then
  BIN=.build/release/dysco-migrate
  if [ ! -x "$BIN" ]; then
    echo "== building the release binary (swift build -c release)"
    swift build -c release --product dysco-migrate
  fi
fi

step() { printf '\n== %s\n' "$*"; }

OUT=$(mktemp /tmp/dysco-demo.XXXXXX)
STATS="$OUT.stats"
CURL_PID=
cleanup() {
  status=$?
  trap - EXIT INT TERM
  if [ -n "$CURL_PID" ]; then kill "$CURL_PID" 2>/dev/null || true; wait "$CURL_PID" 2>/dev/null || true; fi
  rm -f "$OUT" "$STATS"
  step "lab down"
  "$BIN" lab down --name "$LAB" || true
  [ "$status" -eq 0 ] || echo "demo: FAILED (exit $status)" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=8090
step "lab up --name $LAB --subnet $SUBNET --policy-ports 80,5201,$PORT"
"$BIN" lab up --name "$LAB" --subnet "$SUBNET" --policy-ports "80,5201,$PORT"

LABDIR="/run/dysco-migrate/labs/$LAB"
ROOT="$LABDIR/www"
SERVER=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(next(h["address"] for h in s["hosts"] if h["name"]=="server1"))' "$LABDIR/lab.json")

step "writing a ${SIZE_MB} MiB random file into the lab's HTTP root ($ROOT)"
SIZE=$((SIZE_MB * 1024 * 1024))
head -c "$SIZE" /dev/urandom > "$ROOT/blob.bin"
WANT=$(sha256sum "$ROOT/blob.bin" | cut -d' ' -f1)
echo "sha256 $WANT"

step "lab paced-server --lab $LAB --port $PORT --rate $RATE_MB   (server1 sends at most ${RATE_MB} MiB/s per download)"
"$BIN" lab paced-server --lab "$LAB" --port "$PORT" --rate "$RATE_MB"

step "client1 downloads http://$SERVER:$PORT/blob.bin through fw1 (in the background)"
ip netns exec "$LAB-client1" curl -sS --fail -m 300 -o "$OUT" \
  -w '%{size_download} %{time_total} %{speed_download}\n' "http://$SERVER:$PORT/blob.bin" > "$STATS" &
CURL_PID=$!

# Halfway: the file has SIZE/2 bytes.
size() { stat -c %s "$OUT" 2>/dev/null || echo 0; }
for _ in $(seq 1 600); do
  [ "$(size)" -ge $((SIZE / 2)) ] && break
  kill -0 "$CURL_PID" 2>/dev/null || { echo "demo: the download ended before halfway" >&2; exit 1; }
  sleep 0.1
done
echo "halfway: $(size) of $SIZE bytes received"

step "fw1's conntrack entry (the session as the old firewall sees it)"
ip netns exec "$LAB-fw1" conntrack -L -p tcp --dport "$PORT" --state ESTABLISHED 2>/dev/null || true

step "replace --lab $LAB --old fw1 --new fw2   (the download keeps running)"
"$BIN" replace --lab "$LAB" --old fw1 --new fw2
echo "at the swap: $(size) of $SIZE bytes received"

step "fw2's conntrack entry (moved from fw1 with the session)"
ip netns exec "$LAB-fw2" conntrack -L -p tcp --dport "$PORT" --state ESTABLISHED 2>/dev/null || true

step "waiting for the download to finish"
wait "$CURL_PID"
CURL_PID=
read -r BYTES SECONDS_TOTAL SPEED < "$STATS"
GOT=$(sha256sum "$OUT" | cut -d' ' -f1)
echo "received $BYTES bytes in ${SECONDS_TOTAL}s"
python3 -c 'import sys; print("goodput: %.1f Mbit/s" % (float(sys.argv[1]) * 8 / 1e6))' "$SPEED"
if [ "$GOT" = "$WANT" ]; then
  echo "byte-exact: sha256 matches ($GOT)"
else
  echo "sha256 MISMATCH: got $GOT, want $WANT" >&2
  exit 1
fi

step "firewall counters (fw1 carried the first half, fw2 the second; INVALID and policy drops should be 0)"
"$BIN" lab status --name "$LAB"

step "dysco-migrate sessions --netns $LAB-fw2"
"$BIN" sessions --netns "$LAB-fw2" || echo "(sessions command failed)"
