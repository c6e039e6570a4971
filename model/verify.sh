#!/usr/bin/env bash
# Model-checks the reconfiguration protocol (docs/VERIFICATION.md): spin -> gcc -> pan for every shipped
# configuration (each must verify with no error), then every mutant (each must be rejected). Prints states,
# memory and time per run; exits non-zero on any error in a configuration or on a mutant that is accepted.
# Usage: model/verify.sh [-q] [name-filter]
set -uo pipefail
cd "$(dirname "$0")"
MODEL_DIR=$(pwd)
QUIET=0
if [ "${1:-}" = "-q" ]; then QUIET=1; shift; fi
FILTER=${1:-}
command -v spin >/dev/null || { echo "verify: spin is not installed (make setup / apt-get install spin)" >&2; exit 2; }
command -v gcc >/dev/null || { echo "verify: gcc is not installed" >&2; exit 2; }
WORK=$(mktemp -d /tmp/dysco-verify.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PAN_CFLAGS="-O2 -w -DCOLLAPSE -DVECTORSZ=1024"
fail=0

# name | model | spin defines | pan mode (safety | ltl:<name>) | what it covers
CONFIGS=(
  "lock-contention|lock.pml|-DLOSS=2 -DDUP=2 -DREORDER=2 -DCANCEL=1|safety|§3.2 figure 5, two overlapping requests; the winner completes or cancels"
  "lock-exactly-one|lock.pml|-DLOSS=2 -DDUP=2 -DREORDER=2 -DCANCEL=0|safety|no cancels: exactly one request locks and moves"
  "lock-mutex-ltl|lock.pml|-DLOSS=1 -DDUP=1 -DREORDER=1 -DCANCEL=1|ltl:mutex|LTL [] !(operating(1) && operating(2))"
  "replace-stateful|replace.pml|-DSTATEFUL=1 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1 -DFAIL_IMPORT=1|safety|drain, export, import, probes, release, teardown; refused import; deadline"
  "replace-stateless|replace.pml|-DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|§3.5 two-path rules, drain, teardown; deadline"
  "replace-newpath-fails|replace.pml|-DSTATEFUL=1 -DLOSS=1 -DDUP=1 -DREORDER=1 -DFAIL_PATH=1 -DDEADLINE=1|safety|the new path cannot be opened / the new box is down: cancel"
  "replace-ltl-cancel|replace.pml|-DSTATEFUL=1 -DLOSS=1 -DDUP=1 -DREORDER=0 -DDEADLINE=1 -DFAIL_IMPORT=1|ltl:cancelledStaysOld|LTL: once cancelled, on the old path and unlocked for good"
  "replace-ltl-moved|replace.pml|-DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=0 -DDEADLINE=1|ltl:movedStaysNew|LTL: once moved, on the new path and unlocked for good"
  "replace-cancel-resent|replace.pml|-DSTATEFUL=1 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|issue 19: newPathCancel resent until newPathCancelAck, a late newPathSyn refused: after a cancel no new box keeps the session"
  "replace-la-crash|replace.pml|-DSTATEFUL=1 -DLOSS=1 -DDUP=1 -DREORDER=1 -DCRASH_LA=1|safety|issue 19: the left anchor's host dies at any step: the old box's lock and the right anchor's hold expire by silence"
  "replace-la-crash-stateless|replace.pml|-DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DCRASH_LA=1|safety|issue 19: as replace-la-crash, stateless"
  "replace-two-losses|replace.pml|-DSTATEFUL=1 -DLOSS=2 -DDUP=1 -DREORDER=1|safety|two control losses, no fault: it must succeed (no unnecessary failure)"
  "insert-held|replace.pml|-DOLDBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|issue 17: insertion (no old box: the lock goes straight to the right anchor), held: drain, probes, release, teardown; deadline"
  "insert-stateless|replace.pml|-DOLDBOXES=0 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|issue 17: insertion, stateless (§3.5 two-path rules); deadline"
  "insert-newpath-fails|replace.pml|-DOLDBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DFAIL_PATH=1 -DDEADLINE=1|safety|issue 17: insertion, the inserted box is down: cancel"
  "insert-stateful|replace.pml|-DOLDBOXES=0 -DSTATEFUL=1 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1 -DFAIL_IMPORT=1|safety|issue 17: stateful insertion, the state from a donor at the right anchor (export, import, probes, release); refused import / failed export; deadline"
  "delete-held|replace.pml|-DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|issue 17: deletion (newPathSyn straight to the right anchor), held; the removed box's delta D=1 carried by requestLock/ackLock, applied once; deadline"
  "delete-stateless|replace.pml|-DNEWBOXES=0 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|issue 17: deletion, stateless, delta D=1; deadline"
  "delete-two-losses|replace.pml|-DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=2 -DDUP=1 -DREORDER=1|safety|issue 17: deletion, held, two control losses, no fault: it must succeed, with the delta"
  "replace-held|replace.pml|-DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|issue 17: the held mode on a replacement (no state step)"
  "insert-la-crash|replace.pml|-DOLDBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DCRASH_LA=1|safety|issue 17: insertion, held, the left anchor's host dies: the right anchor's hold expires"
  "delete-la-crash|replace.pml|-DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=1 -DCRASH_LA=1|safety|issue 17: deletion, held, the left anchor's host dies: the old box's lock expires"
  "delete-ltl-moved|replace.pml|-DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=0 -DDEADLINE=1|ltl:movedStaysNew|issue 17: LTL on a deletion: once moved, on the new path and unlocked for good"
  "insert-ltl-cancel|replace.pml|-DOLDBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=1 -DREORDER=0 -DDEADLINE=1|ltl:cancelledStaysOld|issue 17: LTL on an insertion: once cancelled, on the old path and unlocked for good"
  "replay-back-and-forth|replay.pml|-DOPS=3 -DREPLAY=2 -DRESTART_CTRL=1 -DRESTART_LA=1|safety|issue 20: B1→B2→B1→B2 back to back under replayed triggers and restarts: only fresh triggers act, every move succeeds"
)

# name | model | spin defines | pan mode | the property it must break | what pan must report (extended regex on its first error)
MUTANTS=(
  "MUT_LOCKED_ACKS|lock.pml|-DMUT_LOCKED_ACKS -DLOSS=0 -DDUP=0 -DREORDER=0 -DCANCEL=0|safety|exactly one winner|lk\[x\]==3"
  "MUT_HELD_FORGOTTEN|lock.pml|-DMUT_HELD_FORGOTTEN -DLOSS=0 -DDUP=0 -DREORDER=0 -DCANCEL=1|safety|no deadlock (the held request)|result\[[12]\]==2"
  "MUT_CANCEL_KEEPS_LOCK(lock)|lock.pml|-DMUT_CANCEL_KEEPS_LOCK -DLOSS=0 -DDUP=0 -DREORDER=0 -DCANCEL=1|safety|after cancel: unlocked|lk\[0\]==1"
  "MUT_KEEP_LOCK(lock)|lock.pml|-DMUT_KEEP_LOCK -DLOSS=0 -DDUP=0 -DREORDER=0 -DCANCEL=0|safety|after success: every lock released|lk\[0\]==1"
  "IMPL_FORGETS_REFUSED|lock.pml|-DIMPL_FORGETS_REFUSED -DLOSS=1 -DDUP=1 -DREORDER=1 -DCANCEL=1|safety|no deadlock (a refused request's duplicate, docs/VERIFICATION.md)|lk\[0\]==1|result\[[12]\]==2"
  "MUT_EARLY_DATA|replace.pml|-DMUT_EARLY_DATA -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|no data on the new path before the state is installed|i==255"
  "MUT_RELEASE_REVERSED|replace.pml|-DMUT_RELEASE_REVERSED -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|every byte delivered once, in order|==rcvNext\)"
  "MUT_NO_DRAIN|replace.pml|-DMUT_NO_DRAIN -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|every byte delivered (teardown before the drain)|rcvNext==2"
  "MUT_NO_DELTA|replace.pml|-DMUT_NO_DELTA -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|sequence numbers (§3.4 delta on the new path)|got\[|i>=1"
  "MUT_STAY_NEW|replace.pml|-DMUT_STAY_NEW -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0 -DDEADLINE=1|safety|after cancel: on the old path|egress==0"
  "MUT_CANCEL_KEEPS_LOCK(replace)|replace.pml|-DMUT_CANCEL_KEEPS_LOCK -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0 -DFAIL_IMPORT=1|safety|after cancel: unlocked|obSt==1"
  "MUT_KEEP_LOCK(replace)|replace.pml|-DMUT_KEEP_LOCK -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|after success: torn down, every lock released|laLocked"
  "MUT_NO_RETX|replace.pml|-DMUT_NO_RETX -DSTATEFUL=1 -DLOSS=1 -DDUP=0 -DREORDER=0|safety|no deadlock (retransmission)|invalid end state"
  "MUT_GIVEUP|replace.pml|-DMUT_GIVEUP -DSTATEFUL=1 -DLOSS=1 -DDUP=0 -DREORDER=0|safety|no unnecessary failure (loss)|deadlineFired"
  "MUT_NACK_DUPLICATE|replace.pml|-DMUT_NACK_DUPLICATE -DSTATEFUL=0 -DLOSS=0 -DDUP=1 -DREORDER=1|safety|no unnecessary failure (duplicates)|deadlineFired"
  "MUT_CANCEL_ONCE|replace.pml|-DMUT_CANCEL_ONCE -DSTATEFUL=1 -DLOSS=1 -DDUP=0 -DREORDER=0 -DDEADLINE=1|safety|after cancel: no new box keeps the session (newPathCancel resent until answered, issue 19)|nbInSession"
  "MUT_SYN_AFTER_CANCEL|replace.pml|-DMUT_SYN_AFTER_CANCEL -DSTATEFUL=1 -DLOSS=0 -DDUP=1 -DREORDER=1 -DDEADLINE=1|safety|after cancel: a late newPathSyn does not make the session again (issue 19)|nbInSession"
  "MUT_NO_LOCK_EXPIRY|replace.pml|-DMUT_NO_LOCK_EXPIRY -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0 -DCRASH_LA=1|safety|the left anchor's host died: the old box's lock expires (issue 19)|obSt!="
  "MUT_HELD_EARLY_RELEASE|replace.pml|-DMUT_HELD_EARLY_RELEASE -DOLDBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|insertion, held: the release waits for both drains (every byte once, in order)|rcvNext"
  "MUT_EARLY_DATA(insert)|replace.pml|-DMUT_EARLY_DATA -DOLDBOXES=0 -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|stateful insertion: no data on the new path before the donor's state is installed|i==255"
  "MUT_DELTA_UNSUMMED|replace.pml|-DMUT_DELTA_UNSUMMED -DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|deletion: the removed box's delta reaches the anchors (§3.4)|raDelta|got\[|i\+raDelta"
  "MUT_DELTA_TWICE|replace.pml|-DMUT_DELTA_TWICE -DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|deletion: the delta is applied exactly once (sequence numbers)|i\+raDelta"
  "MUT_NO_DELTA(delete)|replace.pml|-DMUT_NO_DELTA -DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|safety|deletion: the right anchor applies the removed box's delta|got\[|i>=1"
  "IMPL_ACKAGAIN_NO_DELTA|replace.pml|-DIMPL_ACKAGAIN_NO_DELTA -DNEWBOXES=0 -DHELD=1 -DSTATEFUL=0 -DLOSS=1 -DDUP=0 -DREORDER=0|safety|deletion: an ackAgain answer carries the removed box's delta too (the left anchor's delta)|laDelta"

  "MUT_NO_FRESHNESS|replay.pml|-DMUT_NO_FRESHNESS -DOPS=3 -DREPLAY=1 -DRESTART_CTRL=0 -DRESTART_LA=0|safety|a trigger is acted on only fresh (issue 20)|requested\[k\]"
  "MUT_NO_TIME|replay.pml|-DMUT_NO_TIME -DOPS=2 -DREPLAY=1 -DRESTART_CTRL=0 -DRESTART_LA=1|safety|a restarted receiver takes no recorded trigger (issue 20)|requested\[k\]"
  "IMPL_KEEPS_NEWBOX|replay.pml|-DIMPL_KEEPS_NEWBOX -DOPS=3 -DREPLAY=0 -DRESTART_CTRL=0 -DRESTART_LA=0|safety|back to back: a box takes again a session it left (issue 20)|outcome\[k\]==1"

  "MUT_LOCKED_ACKS(ltl)|lock.pml|-DMUT_LOCKED_ACKS -DLTL_ONLY -DLOSS=0 -DDUP=0 -DREORDER=0 -DCANCEL=0|ltl:mutex|exactly one winner (LTL mutex)|result\\[1\\]==6\\)\\)&&"
  "MUT_STAY_NEW(ltl)|replace.pml|-DMUT_STAY_NEW -DSTATEFUL=1 -DLOSS=0 -DDUP=0 -DREORDER=0 -DDEADLINE=1|ltl:cancelledStaysOld|after cancel: on the old path (LTL)|laSt==12\)\)\)&&"
  "MUT_KEEP_LOCK(ltl)|replace.pml|-DMUT_KEEP_LOCK -DSTATEFUL=0 -DLOSS=0 -DDUP=0 -DREORDER=0|ltl:movedStaysNew|after success: every lock released (LTL)|laSt==10\)\)\)&&")

# run <dir> <model> <defines> <mode>: leaves pan's output in <dir>/pan.out, the time in <dir>/time
run() {
  local dir=$1 model=$2 defines=$3 mode=$4
  mkdir -p "$dir" && cp "$MODEL_DIR/$model" "$dir/" && cd "$dir" || return 3
  # shellcheck disable=SC2086
  spin -a $defines "$model" >spin.out 2>&1 || { cat spin.out; cd "$MODEL_DIR"; return 3; }
  local cflags="$PAN_CFLAGS" panargs="-m20000"
  if [ "$mode" = safety ]; then cflags="$cflags -DSAFETY -DNOCLAIM"; else cflags="$cflags"; panargs="$panargs -a -N ${mode#ltl:}"; fi
  # shellcheck disable=SC2086
  gcc $cflags -o pan pan.c >gcc.out 2>&1 || { cat gcc.out; cd "$MODEL_DIR"; return 3; }
  local t0 t1
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  ./pan $panargs >pan.out 2>&1
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }' >time
  cd "$MODEL_DIR"
}

errors_of() { sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$1/pan.out" | head -1; }
states_of() { awk '/states, stored/ { print $1; exit }' "$1/pan.out"; }
trans_of() { awk '/transitions \(= stored\+matched\)/ { print $1; exit }' "$1/pan.out"; }
mem_of() { awk '/total actual memory usage/ { print $1; exit }' "$1/pan.out"; }
why_of() { grep -m1 -E 'assertion violated|invalid end state|acceptance cycle|claim violated' "$1/pan.out" | sed 's/^pan:[0-9]*: //'; }

echo "== configurations (must verify with 0 errors)"
printf '%-24s %12s %14s %10s %8s  %s\n' configuration states transitions "mem(MB)" "time(s)" result
for c in "${CONFIGS[@]}"; do
  IFS='|' read -r name model defines mode what <<<"$c"
  [ -n "$FILTER" ] && [[ "$name" != *"$FILTER"* ]] && continue
  dir="$WORK/$name"
  run "$dir" "$model" "$defines" "$mode"
  errs=$(errors_of "$dir"); result=ok
  if [ "${errs:-x}" != 0 ]; then
    result="FAILED: $(why_of "$dir")"; fail=1
    [ -f "$dir/$model.trail" ] && (cd "$dir" && spin -t -p -g $defines "$model" | tail -60) >&2
  fi
  printf '%-24s %12s %14s %10s %8s  %s\n' "$name" "$(states_of "$dir")" "$(trans_of "$dir")" "$(mem_of "$dir")" "$(cat "$dir/time")" "$result"
  [ $QUIET = 0 ] && printf '    %s: %s %s (%s)\n' "$model" "$defines" "${mode}" "$what"
done

echo "== mutants (each must be rejected)"
printf '%-30s %10s %8s  %s\n' mutant states "time(s)" "result"
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r name model defines mode property expect <<<"$m"
  [ -n "$FILTER" ] && [[ "$name" != *"$FILTER"* ]] && continue
  dir="$WORK/mutant-${name//[()]/_}"
  run "$dir" "$model" "$defines" "$mode"
  errs=$(errors_of "$dir")
  if [ "${errs:-0}" -ge 1 ] 2>/dev/null && why_of "$dir" | grep -qE "$expect"; then
    result="rejected: $(why_of "$dir")"
  elif [ "${errs:-0}" -ge 1 ] 2>/dev/null; then
    result="REJECTED FOR ANOTHER REASON (expected /$expect/): $(why_of "$dir")"; fail=1
  else
    result="ACCEPTED (the model does not detect: $property)"; fail=1
  fi
  printf '%-30s %10s %8s  %s\n' "$name" "$(states_of "$dir")" "$(cat "$dir/time")" "$result"
  [ $QUIET = 0 ] && printf '    breaks: %s\n' "$property"
done

if [ $fail != 0 ]; then echo "verify: FAILED" >&2; exit 1; fi
echo "verify: all configurations verified, all mutants rejected"
