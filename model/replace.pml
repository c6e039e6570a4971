/*
 * dysco-migrate: one reconfiguration of one session (paper §3.1, §3.4-§3.6), written for Spin.
 *
 * Old path  : LA -> OB -> RA          (left anchor, old box, right anchor); OLDBOXES=0: LA -> RA
 * New path  : LA -> NB -> RA          (NB: the new middlebox); NEWBOXES=0: LA -> RA
 *             Paper §3: OLDBOXES=0 is an insertion (the left anchor's right neighbour is the right anchor),
 *             NEWBOXES=0 a deletion (newPathSyn goes straight to the right anchor, the old box is torn down).
 * Modes     : STATEFUL=1 (hold new data, move the old box's state, release), HELD=1 (hold new data and release
 *             after both drains, no state step: insertion and removal), neither: stateless (§3.5 two-path rules).
 *             A stateful insertion (OLDBOXES=0 STATEFUL=1) takes the state from a donor at the right anchor: the
 *             old-box role (Donor) at the right anchor's agent, which answers stateRequest while the right anchor
 *             is locked for the request.
 * Data      : the left endpoint writes N bytes (abstract sequence numbers 0..N-1); the old box adds a delta
 *             of D bytes (§3.4), so the right endpoint expects wire numbers DW..N+DW-1 (DW = D with an old box,
 *             0 without). requestLock carries the sum of the old path's deltas to the right anchor (rightDelta),
 *             ackLock carries it back to the left anchor (leftDelta); the right anchor applies its sum to what
 *             comes in on the new path, exactly once.
 * Control   : every hop loses (budget LOSS), duplicates (DUP) and reorders (REORDER) control messages; only
 *             the left anchor retransmits (on a timeout, while a loss is unanswered), as MigrationCoordinator.
 * Faults    : FAIL_PATH (the new path cannot be opened / the new box is down), FAIL_IMPORT (the new box
 *             refuses the state), DEADLINE (the left anchor's deadline may pass at any moment before release),
 *             CRASH_LA (the left anchor's host dies at any step from the lock to the teardown: issue 19, the
 *             agents it locked give their part up after their silence timeouts).
 *
 * Transitions of the roles are written TR(FROM, event, TO): the same rows as model/transitions.tsv (the
 * conformance test extracts them from this file and compares). Mutants: -DMUT_<name> (see model/verify.sh).
 */

#ifndef STATEFUL
#define STATEFUL 1
#endif
#ifndef LOSS
#define LOSS 1
#endif
#ifndef DUP
#define DUP 1
#endif
#ifndef REORDER
#define REORDER 1
#endif
#ifndef FAIL_PATH
#define FAIL_PATH 0
#endif
#ifndef FAIL_IMPORT
#define FAIL_IMPORT 0
#endif
#ifndef DEADLINE
#define DEADLINE 0
#endif
#ifndef CRASH_LA
#define CRASH_LA 0
#endif
#ifndef OLDBOXES
#define OLDBOXES 1
#endif
#ifndef NEWBOXES
#define NEWBOXES 1
#endif
#ifndef HELD
#define HELD 0
#endif
/* the anchors hold new data (stateful or held) */
#define HOLDS (STATEFUL || HELD)
#if STATEFUL && HELD
#error "STATEFUL and HELD are two modes: set one"
#endif
#if STATEFUL && !NEWBOXES
#error "a stateful deletion has no box to take the state: a deletion is HELD or stateless"
#endif
#if !OLDBOXES && !NEWBOXES
#error "an old or a new box is needed"
#endif
/* sends of the cancel before the left anchor gives up on a new box that does not answer newPathCancel (maxTries;
   above the loss budgets, so only a box that is down makes the left anchor give up) */
#define MAXC 3
#define N 2
#define D 1
#if OLDBOXES
#define DW D                      /* the sum of the old path's deltas: what the right endpoint expects */
#else
#define DW 0
#endif
#define CAP 6
#define PROBE 255
#define OUT_PROBE 99

#define TR(f, e, t) assert(st == f); st = t

/* a data byte the left anchor sends on the new path; MUT_DELTA_TWICE: the left anchor applies the delta ackLock
   carried to it as well, so the right anchor's addition is a second one */
#ifdef MUT_DELTA_TWICE
#define NEWSEQ(x) (x + laDelta)
#else
#define NEWSEQ(x) (x)
#endif

/* a silence timeout can fire (the left anchor gave up, or its host died, and nothing else moves) */
#define LA_GONE ((laSt == LA_MOVED || laSt == LA_CANCELLED || laSt == LA_CRASHED) && (owed == 0 || laSt == LA_CRASHED))
#define RA_SILENCE (LA_GONE && raSt >= RA_LOCKED && raSt <= RA_RELEASED)
#ifdef MUT_NO_LOCK_EXPIRY
#define OB_SILENCE false
#else
/* the old box: only the crash leaves it locked in the model (a left anchor that ends waits for the old path's
   answer, and the model has no give-up on the old path), so only then may it expire: a lock kept after a cancel
   or a teardown stays a bug the model sees (MUT_CANCEL_KEEPS_LOCK) */
#define OB_SILENCE (OLDBOXES && laSt == LA_CRASHED && (obSt == OB_PENDING || obSt == OB_LOCKED || obSt == OB_EXPORTED || obSt == OB_ANSWERED))
#endif

mtype = { requestLock, ackLock, nackLock, cancelLock, ackCancel, newPathSyn, newPathSynAck, newPathCancel,
          newPathCancelAck, newPathRefused, drainStart, drained, stateRequest, statePut, stateInstalled, oldPathFin,
          oldPathFinAck };

/* role states (values shared by all roles: names are prefixed by the role) */
#define LA_IDLE 13
#define LA_LOCK 1
#define LA_NEWPATH 2
#define LA_DRAIN 3
#define LA_DRAIN_SELF 4
#define LA_DRAIN_PEER 5
#define LA_STATE 6
#define LA_RELEASE 7
#define LA_TEARDOWN 8
#define LA_CANCEL 9
#define LA_MOVED 10
#define LA_REFUSED 11
#define LA_CANCELLED 12
#define LA_CRASHED 14            /* not a state of the implementation: the host is gone (CRASH_LA) */

#define OB_UNLOCKED 1
#define OB_PENDING 2
#define OB_LOCKED 3
#define OB_EXPORTING 4
#define OB_EXPORTED 5
#define OB_GONE 6
#define OB_ANSWERED 7
#define OB_ENDED 8

/* the donor of a stateful insertion (same values as the old box's: obSt shows either) */
#define DO_LOCKED 3
#define DO_EXPORTING 4
#define DO_EXPORTED 5
#define DO_ANSWERED 7
#define DO_ENDED 8

#define NB_IDLE 1
#define NB_CREATED 2
#define NB_ESTABLISHED 3
#define NB_IMPORTING 4
#define NB_INSTALLED 5
#define NB_REFUSED 6
#define NB_GONE 7

#define RA_IDLE 1
#define RA_LOCKED 2
#define RA_PATH 3
#define RA_DRAIN 4
#define RA_PROBING 5
#define RA_RELEASED 6
#define RA_DONE 7
#define RA_CANCELLED 8

/* egress of the left anchor's data plane */
#define E_OLD 0
#define E_HOLD 1
#define E_NEW 2

chan cLA = [CAP] of { mtype, byte };
chan cOB = [CAP] of { mtype, byte };
chan cNB = [CAP] of { mtype, byte };
chan cRA = [CAP] of { mtype, byte };
/* data plane, lossless FIFO per hop; PROBE is a window-opening probe (a pure ACK on the new path) */
chan dLAOB = [N] of { byte };
chan dOBRA = [N] of { byte };
chan dLANB = [N + 4] of { byte };
chan dNBRA = [N + 4] of { byte };
chan dRANB = [2] of { byte };
chan dNBLA = [2] of { byte };
chan aLA = [N] of { byte };       /* cumulative ACKs of the old path, right endpoint -> left anchor */
chan rtx = [N] of { byte };       /* bytes TCP must retransmit (dropped by a new path that a cancel removed) */

/* the neighbours on each path: with no old box the anchors are neighbours on the old path, with no new box on
   the new path */
#if OLDBOXES
#define cOLDR cOB                 /* the left anchor's old right neighbour */
#define cOLDL cOB                 /* the right anchor's old left neighbour */
#define dOLD dLAOB                /* the left anchor's old-path data */
#else
#define cOLDR cRA
#define cOLDL cLA
#define dOLD dOBRA
#endif
#if NEWBOXES
#define cNEWR cNB
#define cNEWL cNB
#define dNEW dLANB
#define dNEWBACK dRANB
#else
#define cNEWR cRA
#define cNEWL cLA
#define dNEW dNBRA
#define dNEWBACK dNBLA
#endif

byte loss = LOSS, dup = DUP, reord = REORDER;
byte owed;                        /* control losses not yet answered by a retransmission */
bool deadlineFired, pathFailed, importRefused;
/* observed state, for the properties */
byte laSt = LA_LOCK, obSt = OB_UNLOCKED, nbSt = NB_IDLE, raSt = RA_IDLE;
byte egress = E_OLD;
bool laLocked = true;             /* the left anchor's own right lock, taken at the trigger */
bool raOnNew, raHolding, obInSession = OLDBOXES, nbInSession;
byte raDelta, laDelta;            /* the deltas the anchors took from requestLock / ackLock (§3.4) */
byte written;
bool got[N];
byte rcvNext;
bool stateExported, cancelledBack;

inline SEND(ch, t, a) {
  if
  :: loss > 0 -> loss--; owed++
  :: ch!t, a
  :: dup > 0 -> dup--; ch!t, a; ch!t, a
  fi
}

/* a receiver may take a later message first (budget REORDER) */
inline REORDERING(ch) {
  reord > 0 && len(ch) > 1 -> reord--; ch?t, a; ch!t, a
}

inline RESEND() {
  if
  :: out == OUT_PROBE -> dNEW!PROBE
  :: out == newPathSyn -> SEND(cNEWR, newPathSyn, 0)
  :: out == drainStart -> SEND(cRA, drainStart, HOLDS)
  :: out == stateRequest -> SEND(cOB, stateRequest, 0)      /* to the old box, or to the donor */
  :: else -> SEND(cOLDR, out, 0)
  fi
}

/* cancelAnchor: back on the old path at once (held bytes go there); newPathCancel; cancelLock along the old path */
inline CANCEL() {
#ifndef MUT_STAY_NEW
  if
  :: egress == E_HOLD -> do :: held < written -> dOLD!held; held++; oldSent = held :: else -> break od
  :: else
  fi;
  egress = E_OLD; cancelledBack = true;
#endif
  /* new boxes exist from the new-path step on; newPathCancel is sent until newPathCancelAck (issue 19) */
  lockAcked = false; nbAcked = cancelAtLock || !NEWBOXES; ctries = 0;
  if :: !nbAcked -> SEND(cNB, newPathCancel, 0) :: else fi;
#ifdef MUT_CANCEL_ONCE
  nbAcked = true;                 /* sent once, as before issue 19: not retransmitted, not waited for */
#endif
  out = cancelLock; SEND(cOLDR, cancelLock, 0)
}

#define CANCEL_FROM(ev) \
  cancelAtLock = (st == LA_LOCK); \
  if \
  :: st == LA_LOCK -> TR(LA_LOCK, ev, LA_CANCEL) \
  :: st == LA_NEWPATH -> TR(LA_NEWPATH, ev, LA_CANCEL) \
  :: st == LA_DRAIN -> TR(LA_DRAIN, ev, LA_CANCEL) \
  :: st == LA_DRAIN_SELF -> TR(LA_DRAIN_SELF, ev, LA_CANCEL) \
  :: st == LA_DRAIN_PEER -> TR(LA_DRAIN_PEER, ev, LA_CANCEL) \
  :: st == LA_STATE -> TR(LA_STATE, ev, LA_CANCEL) \
  :: st == LA_RELEASE -> TR(LA_RELEASE, ev, LA_CANCEL) \
  fi; \
  CANCEL()

proctype LeftAnchor() {
  mtype t; byte a;
  byte st = LA_IDLE;
  byte oldSent, oldAcked, held;   /* held: bytes [held, written) wait in the anchor buffer */
  byte out = requestLock;         /* the outstanding message (OUT_PROBE: the probe) */
  byte i;
  bool cancelAtLock, lockAcked, nbAcked;   /* the cancel: ackCancel and newPathCancelAck came back */
  byte ctries;                             /* retransmissions of the cancel */
  atomic { TR(LA_IDLE, trigger, LA_LOCK); SEND(cOLDR, requestLock, 0) }
end:
  do
  /* ---- the endpoint writes a byte; egress per phase (§3.5 two-path rules, stateful hold) */
  /* ---- the left anchor's host dies (CRASH_LA): it sends nothing from now on; what reaches it is dropped */
  :: atomic { CRASH_LA && st >= LA_LOCK && st <= LA_TEARDOWN -> st = LA_CRASHED; laSt = st }
  :: atomic { written < N && st != LA_CRASHED ->
       if
       :: egress == E_OLD -> dOLD!written; oldSent = written + 1
       :: egress == E_NEW -> dNEW!NEWSEQ(written)
       :: egress == E_HOLD -> skip
       fi;
       written++ }
  :: atomic { nempty(rtx) && egress != E_HOLD && st != LA_CRASHED -> rtx?i; if :: egress == E_OLD -> dOLD!i :: else -> dNEW!NEWSEQ(i) fi }
  :: atomic { aLA?i -> if :: i > oldAcked -> oldAcked = i :: else fi }
  /* ---- data plane: everything sent on the old path is acknowledged (AnchorState.sentDrained) */
#ifdef MUT_NO_DRAIN
  :: atomic { (st == LA_DRAIN || st == LA_DRAIN_PEER) ->       /* does not wait for the old path's ACKs */
#else
  :: atomic { (st == LA_DRAIN || st == LA_DRAIN_PEER) && oldAcked >= oldSent ->
#endif
       if
       :: st == LA_DRAIN -> TR(LA_DRAIN, dataDrained, LA_DRAIN_SELF)
       :: st == LA_DRAIN_PEER ->
#if STATEFUL
            TR(LA_DRAIN_PEER, dataDrained, LA_STATE); out = stateRequest; SEND(cOB, stateRequest, 0)
#else
#if HELD
            /* held: both directions drained, no state moves: promote, setPhase(probing), sendProbe */
            TR(LA_DRAIN_PEER, dataDrained, LA_RELEASE); out = OUT_PROBE; dNEW!PROBE
#else
            TR(LA_DRAIN_PEER, dataDrained, LA_TEARDOWN); out = oldPathFin; SEND(cOLDR, oldPathFin, 0)
#endif
#endif
       fi }
  /* ---- retransmission (20 ms doubling to 100 ms): here when the system is quiet and a loss is unanswered */
#ifndef MUT_NO_RETX
  :: atomic { timeout && owed > 0 && st != LA_MOVED && st != LA_REFUSED && st != LA_CANCELLED && st != LA_CRASHED ->
       owed--;
       if
       :: st == LA_CANCEL ->
            /* cancelLock until ackCancel, newPathCancel until newPathCancelAck, on one timer (issue 19) */
            if
            :: ctries >= MAXC && lockAcked ->
                 /* maxTries: the new box does not answer (it is down): its session, if any, expires by idleness */
                 TR(LA_CANCEL, retransmit, LA_CANCELLED); laLocked = false
            :: else ->
                 ctries++;
                 if :: !nbAcked -> SEND(cNB, newPathCancel, 0) :: else fi;
                 if :: !lockAcked -> SEND(cOLDR, cancelLock, 0) :: else fi
            fi
       :: st == LA_TEARDOWN && OLDBOXES && !obInSession ->
            /* the old box left, its oldPathFinAck was lost: after maxTries sends, moved (teardown unanswered) */
            TR(LA_TEARDOWN, retransmit, LA_MOVED); laLocked = false
       :: else ->
#ifdef MUT_GIVEUP
            if :: st < LA_RELEASE -> CANCEL_FROM(retransmit) :: else -> RESEND() fi
#else
            RESEND()
#endif
       fi;
       laSt = st }
#endif
  /* ---- the deadline passes before the release (3 s by default): cancel */
  :: atomic { DEADLINE && !deadlineFired && st >= LA_LOCK && st <= LA_RELEASE ->
       deadlineFired = true; CANCEL_FROM(deadline); laSt = st }
  /* ---- control messages */
  :: atomic { REORDERING(cLA) }
  :: atomic { cLA?t, a ->
       if
       :: t == ackLock && st == LA_LOCK ->
            if
            :: FAIL_PATH -> pathFailed = true; TR(LA_LOCK, ackLock, LA_NEWPATH); TR(LA_NEWPATH, pathRefused, LA_CANCEL); CANCEL()
            :: else -> TR(LA_LOCK, ackLock, LA_NEWPATH); laDelta = a; out = newPathSyn; SEND(cNEWR, newPathSyn, 0)
            fi
       :: t == nackLock && st == LA_LOCK -> TR(LA_LOCK, nackLock, LA_REFUSED); laLocked = false
       :: t == newPathSynAck && st == LA_NEWPATH ->
            TR(LA_NEWPATH, newPathSynAck, LA_DRAIN);
#if HOLDS
            egress = E_HOLD; held = written;
#ifdef MUT_EARLY_DATA
            egress = E_NEW;
#endif
#else
            egress = E_NEW;               /* promote: new bytes on the new path, old ones stay on the old */
#endif
            out = drainStart; SEND(cRA, drainStart, HOLDS)
#ifdef MUT_HELD_EARLY_RELEASE
       /* held: the release follows the right anchor's drained without waiting for our own drain */
       :: t == drained && st == LA_DRAIN && HELD -> st = LA_RELEASE; out = OUT_PROBE; dNEW!PROBE
#endif
       :: t == drained && st == LA_DRAIN -> TR(LA_DRAIN, drained, LA_DRAIN_PEER)
       :: t == drained && st == LA_DRAIN_SELF ->
#if STATEFUL
            TR(LA_DRAIN_SELF, drained, LA_STATE); out = stateRequest; SEND(cOB, stateRequest, 0)
#else
#if HELD
            TR(LA_DRAIN_SELF, drained, LA_RELEASE); out = OUT_PROBE; dNEW!PROBE
#else
            TR(LA_DRAIN_SELF, drained, LA_TEARDOWN); out = oldPathFin; SEND(cOLDR, oldPathFin, 0)
#endif
#endif
       :: t == stateInstalled && st == LA_STATE && a ->
            TR(LA_STATE, stateInstalled.ok, LA_RELEASE);
            out = OUT_PROBE; dNEW!PROBE           /* promote, setPhase(probing), sendProbe */
       :: t == stateInstalled && st == LA_STATE && !a -> TR(LA_STATE, stateInstalled.refused, LA_CANCEL); CANCEL()
       :: t == oldPathFinAck && st == LA_TEARDOWN ->
            TR(LA_TEARDOWN, oldPathFinAck, LA_MOVED); laLocked = false
#ifdef MUT_KEEP_LOCK
            ; laLocked = true
#endif
       :: t == ackCancel && st == LA_CANCEL && !lockAcked ->
            lockAcked = true;
            if :: nbAcked -> TR(LA_CANCEL, ackCancel, LA_CANCELLED); laLocked = false :: else fi
       :: t == newPathCancelAck && st == LA_CANCEL && !nbAcked ->
            nbAcked = true;
            if :: lockAcked -> TR(LA_CANCEL, newPathCancelAck, LA_CANCELLED); laLocked = false :: else fi
       :: else -> skip                 /* a duplicate or a late answer: nothing changes */
       fi;
       laSt = st }
  /* ---- the right anchor's probe came back on the new path: last probe, release the buffer, teardown */
  :: atomic { dNBLA?i ->
       if
       :: st == LA_RELEASE ->
            TR(LA_RELEASE, newPathPacket, LA_TEARDOWN);
            dNEW!PROBE;
            egress = E_NEW;
#ifdef MUT_RELEASE_REVERSED
            i = written; do :: i > held -> i--; dNEW!i :: else -> break od; held = written;
#else
            do :: held < written -> dNEW!NEWSEQ(held); held++ :: else -> break od;
#endif
            out = oldPathFin; SEND(cOLDR, oldPathFin, 0)
       :: else -> skip
       fi;
       laSt = st }
  od
}

proctype OldBox() {
  mtype t; byte a; byte i;
  byte st = OB_UNLOCKED;
  bool ended, installedOk;
  byte ackDelta;                  /* leftDelta of the ackLock passed on: an ackAgain answers with it too */
end:
  do
  :: atomic { dLAOB?i ->
       if
       :: obInSession -> assert(!(STATEFUL && stateExported && !cancelledBack)); dOBRA!i + D  /* the exported state is final */
       :: else -> skip                  /* left the session: a byte still on the old path is lost */
       fi }
  :: atomic { REORDERING(cOB) }
  :: atomic { cOB?t, a ->
       if
       /* ---- from the left */
       /* §3.4: this box adds its delta to requestLock's rightDelta (MUT_DELTA_UNSUMMED: passed on unchanged) */
#ifdef MUT_DELTA_UNSUMMED
       :: t == requestLock && st == OB_UNLOCKED && !ended -> st = OB_PENDING; SEND(cRA, requestLock, a)
       :: t == requestLock && st == OB_PENDING -> SEND(cRA, requestLock, a)
#else
       :: t == requestLock && st == OB_UNLOCKED && !ended -> TR(OB_UNLOCKED, requestLock, OB_PENDING); SEND(cRA, requestLock, a + D)
       :: t == requestLock && st == OB_PENDING -> SEND(cRA, requestLock, a + D)      /* forwardDuplicate */
#endif
#ifdef IMPL_ACKAGAIN_NO_DELTA
       /* MigrationCoordinator before the fix (OldPathHop.requestLock, .ackAgain) answered a duplicate with leftDelta 0 */
       :: t == requestLock && st != OB_UNLOCKED && st != OB_PENDING && st != OB_ENDED && st != OB_GONE -> SEND(cLA, ackLock, 0)
#else
       :: t == requestLock && st != OB_UNLOCKED && st != OB_PENDING && st != OB_ENDED && st != OB_GONE -> SEND(cLA, ackLock, ackDelta) /* ackAgain */
#endif
       :: t == cancelLock && st != OB_UNLOCKED && st != OB_ENDED && st != OB_GONE ->
            ended = true;
#ifndef MUT_CANCEL_KEEPS_LOCK
            if
            :: st == OB_PENDING -> TR(OB_PENDING, cancelLock, OB_ENDED)
            :: st == OB_LOCKED -> TR(OB_LOCKED, cancelLock, OB_ENDED)
            :: st == OB_EXPORTING -> TR(OB_EXPORTING, cancelLock, OB_ENDED)
            :: st == OB_EXPORTED -> TR(OB_EXPORTED, cancelLock, OB_ENDED)
            :: st == OB_ANSWERED -> TR(OB_ANSWERED, cancelLock, OB_ENDED)
            fi;
#endif
            SEND(cRA, cancelLock, 0)
       :: t == cancelLock && st == OB_UNLOCKED -> TR(OB_UNLOCKED, cancelLock, OB_ENDED); ended = true; SEND(cRA, cancelLock, 0)
       :: t == cancelLock && (st == OB_ENDED || st == OB_GONE) -> SEND(cRA, cancelLock, 0)
       :: t == stateRequest && st == OB_LOCKED -> TR(OB_LOCKED, stateRequest, OB_EXPORTING)
       :: t == stateRequest && st == OB_EXPORTED -> SEND(cNB, statePut, 0)     /* a retransmission: put again */
       :: t == stateRequest && st == OB_ANSWERED -> SEND(cLA, stateInstalled, installedOk)
       :: t == stateRequest && (st == OB_UNLOCKED || st == OB_ENDED) -> SEND(cLA, stateInstalled, 0)
       :: t == oldPathFin && st != OB_GONE -> SEND(cRA, oldPathFin, 0)
       :: t == oldPathFin && st == OB_GONE -> owed++      /* the box left: dropped (unknown session) */
       /* ---- from the right (answers travel back along the old path) */
       :: t == ackLock && st == OB_PENDING -> TR(OB_PENDING, ackLock, OB_LOCKED); ackDelta = a + D; SEND(cLA, ackLock, ackDelta)
       :: t == nackLock && st == OB_PENDING -> TR(OB_PENDING, nackLock, OB_UNLOCKED); SEND(cLA, nackLock, 0)
       :: t == ackCancel -> SEND(cLA, ackCancel, 0)
       :: t == oldPathFinAck && st != OB_GONE ->
            if
            :: st == OB_LOCKED -> TR(OB_LOCKED, oldPathFinAck, OB_GONE)
            :: st == OB_EXPORTED -> TR(OB_EXPORTED, oldPathFinAck, OB_GONE)
            :: st == OB_ANSWERED -> TR(OB_ANSWERED, oldPathFinAck, OB_GONE)
            :: else -> assert(false)     /* teardown of a segment this box did not lock */
            fi;
            obInSession = false; SEND(cLA, oldPathFinAck, 0)
       /* ---- from the new box: the import's outcome, passed to the left anchor */
       :: t == stateInstalled && st == OB_EXPORTED -> TR(OB_EXPORTED, stateInstalled, OB_ANSWERED); installedOk = a; SEND(cLA, stateInstalled, a)
       :: t == stateInstalled && st == OB_ANSWERED -> installedOk = a; SEND(cLA, stateInstalled, a)
       :: else -> skip
       fi;
       obSt = st }
  /* ---- its lock's silence timeout (30 s without a message of the request; issue 19): the left anchor is gone */
#ifndef MUT_NO_LOCK_EXPIRY
  :: atomic { timeout && OB_SILENCE ->
       ended = true;
       if
       :: st == OB_PENDING -> TR(OB_PENDING, silence, OB_ENDED)
       :: st == OB_LOCKED -> TR(OB_LOCKED, silence, OB_ENDED)
       :: st == OB_EXPORTED -> TR(OB_EXPORTED, silence, OB_ENDED)
       :: st == OB_ANSWERED -> TR(OB_ANSWERED, silence, OB_ENDED)
       fi;
       obSt = st }
#endif
  /* ---- the export (conntrack) completes */
  :: atomic { st == OB_EXPORTING ->
       if
       :: TR(OB_EXPORTING, stateExported.ok, OB_EXPORTED); stateExported = true; SEND(cNB, statePut, 0)
       :: FAIL_IMPORT -> importRefused = true;     /* the export fails (a state transfer failure, as a refused import) */
            TR(OB_EXPORTING, stateExported.failed, OB_ANSWERED); installedOk = false; SEND(cLA, stateInstalled, 0)
       fi;
       obSt = st }
  od
}

/* The donor of a stateful insertion (OLDBOXES=0): the old-box role at the right anchor's agent (MigrationCoordinator:
   an OldBox made by a stateRequest the right anchor of the request receives), role DO in model/transitions.tsv.
   It answers while the right anchor is locked for the request; it is dropped with the right anchor (cancel,
   teardown, silence), after which a stateRequest is refused and the export's or the import's answer is ignored. */
#define DONOR_GONE (raSt == RA_CANCELLED || raSt == RA_DONE || raSt == RA_IDLE)
proctype Donor() {
  mtype t; byte a;
  byte st = DO_LOCKED;            /* the right anchor's lock stands for the donor's */
  bool installedOk;
end:
  do
  :: atomic { REORDERING(cOB) }
  :: atomic { cOB?t, a ->
       if
       :: t == stateRequest && DONOR_GONE -> SEND(cLA, stateInstalled, 0)   /* not locked for it: refused */
       :: t == stateRequest && !DONOR_GONE && st == DO_LOCKED -> TR(DO_LOCKED, stateRequest, DO_EXPORTING)
       :: t == stateRequest && !DONOR_GONE && st == DO_EXPORTED -> SEND(cNB, statePut, 0)
       :: t == stateRequest && !DONOR_GONE && st == DO_ANSWERED -> SEND(cLA, stateInstalled, installedOk)
       :: t == stateInstalled && !DONOR_GONE && st == DO_EXPORTED ->
            TR(DO_EXPORTED, stateInstalled, DO_ANSWERED); installedOk = a; SEND(cLA, stateInstalled, a)
       :: t == stateInstalled && !DONOR_GONE && st == DO_ANSWERED -> installedOk = a; SEND(cLA, stateInstalled, a)
       :: else -> skip
       fi;
       obSt = st }
  :: atomic { st == DO_EXPORTING ->
       if
       :: DONOR_GONE -> st = DO_ENDED     /* dropped with the right anchor while exporting: the result is ignored */
       :: !DONOR_GONE -> TR(DO_EXPORTING, stateExported.ok, DO_EXPORTED); stateExported = true; SEND(cNB, statePut, 0)
       :: !DONOR_GONE && FAIL_IMPORT -> importRefused = true;
            TR(DO_EXPORTING, stateExported.failed, DO_ANSWERED); installedOk = false; SEND(cLA, stateInstalled, 0)
       fi;
       obSt = st }
  od
}

proctype NewBox() {
  mtype t; byte a; byte i;
  byte st = NB_IDLE;
  bool down = false;
  if :: FAIL_PATH -> down = true :: else fi;
end:
  do
  :: atomic { dLANB?i ->
       if
       :: st == NB_GONE || st == NB_IDLE || st == NB_REFUSED -> if :: i != PROBE -> rtx!i :: else fi  /* TCP resends it */
       :: else ->
            assert(i == PROBE || !STATEFUL || st == NB_INSTALLED);  /* no data before the state is installed */
            assert(i == PROBE || !HELD || egress == E_NEW);          /* held: no data before the release */
            dNBRA!i
       fi }
  :: atomic { dRANB?i -> if :: st != NB_GONE -> dNBLA!i :: else fi }
  :: atomic { REORDERING(cNB) }
  :: atomic { cNB?t, a ->
       if
       :: down -> owed++                 /* the new box is down: as lost */
       :: t == newPathSyn && st == NB_IDLE -> TR(NB_IDLE, newPathSyn, NB_CREATED); nbInSession = true; SEND(cRA, newPathSyn, 0)
       :: t == newPathSyn && st != NB_IDLE && st != NB_GONE -> SEND(cRA, newPathSyn, 0)
       :: t == newPathSynAck && st == NB_CREATED -> TR(NB_CREATED, newPathSynAck, NB_ESTABLISHED); SEND(cLA, newPathSynAck, 0)
       :: t == newPathSynAck && st != NB_IDLE && st != NB_CREATED && st != NB_GONE -> SEND(cLA, newPathSynAck, 0)
       :: t == statePut && st == NB_ESTABLISHED -> TR(NB_ESTABLISHED, statePut, NB_IMPORTING)
       :: t == statePut && st == NB_INSTALLED -> SEND(cOB, stateInstalled, 1)
       :: t == statePut && st == NB_REFUSED -> SEND(cOB, stateInstalled, 0)
       :: t == newPathCancel && st != NB_GONE ->
            if
            :: st == NB_IDLE -> TR(NB_IDLE, newPathCancel, NB_GONE)
            :: st == NB_CREATED -> TR(NB_CREATED, newPathCancel, NB_GONE)
            :: st == NB_ESTABLISHED -> TR(NB_ESTABLISHED, newPathCancel, NB_GONE)
            :: st == NB_IMPORTING -> TR(NB_IMPORTING, newPathCancel, NB_GONE)
            :: st == NB_INSTALLED -> TR(NB_INSTALLED, newPathCancel, NB_GONE)
            :: st == NB_REFUSED -> TR(NB_REFUSED, newPathCancel, NB_GONE)
            fi;
            nbInSession = false; SEND(cLA, newPathCancelAck, 0)
       :: t == newPathCancel && st == NB_GONE -> SEND(cLA, newPathCancelAck, 0)
       /* a late newPathSyn (duplicated, reordered) after the cancel: refused, the session is not made again */
#ifdef MUT_SYN_AFTER_CANCEL
       :: t == newPathSyn && st == NB_GONE -> st = NB_CREATED; nbInSession = true; SEND(cRA, newPathSyn, 0)
#else
       :: t == newPathSyn && st == NB_GONE -> SEND(cLA, newPathRefused, 0)
#endif
       :: else -> skip
       fi;
       nbSt = st }
  /* ---- the import completes, or the new box refuses it */
  :: atomic { st == NB_IMPORTING ->
       if
       :: TR(NB_IMPORTING, stateImported.ok, NB_INSTALLED); SEND(cOB, stateInstalled, 1)
       :: FAIL_IMPORT -> importRefused = true; TR(NB_IMPORTING, stateImported.refused, NB_REFUSED); SEND(cOB, stateInstalled, 0)
       fi;
       nbSt = st }
  od
}

/* The right endpoint's TCP: takes wire numbers, checks them, reassembles. */
inline DELIVER(seq) {
  assert(seq >= DW && seq < N + DW);     /* the sequence numbers the endpoint sees are right (§3.4) */
  assert(!got[seq - DW]);                /* each byte once */
#if HOLDS
  assert(seq - DW == rcvNext);           /* stateful / held: in order on the wire too (drain, hold, release) */
#endif
  got[seq - DW] = true;
  do :: rcvNext < N && got[rcvNext] -> rcvNext++ :: else -> break od
}

proctype RightAnchor() {
  mtype t; byte a; byte i;
  byte st = RA_IDLE;
  bool ended, drainedHere;
end:
  do
  :: atomic { dOBRA?i ->
       if
       :: st != RA_DONE -> DELIVER(i); aLA!rcvNext
       :: else -> skip                  /* the old subsession is gone */
       fi }
  :: atomic { dNBRA?i ->
       if
       :: i == PROBE ->
            if
            :: st == RA_DRAIN && HOLDS -> TR(RA_DRAIN, newPathPacket, RA_PROBING); raOnNew = true; dNEWBACK!PROBE
            :: st == RA_PROBING -> TR(RA_PROBING, newPathPacket, RA_RELEASED)
            :: else -> skip
            fi
       :: i != PROBE && st == RA_CANCELLED -> rtx!i   /* the new subsession is gone: TCP resends it */
       :: else ->
            if
            :: st == RA_PROBING -> TR(RA_PROBING, newPathPacket, RA_RELEASED)
            :: else -> skip
            fi;
#ifdef MUT_NO_DELTA
            DELIVER(i)
#else
            DELIVER(i + raDelta)          /* §3.4: in from the new path: add the delta requestLock carried */
#endif
       fi;
       raSt = st }
  :: atomic { (st == RA_DRAIN || st == RA_PROBING || st == RA_RELEASED) && !drainedHere -> drainedHere = true;
       SEND(cLA, drained, 0) }
  /* ---- 10 s without a word from the left anchor (it gave up): back on the old path, or done if released */
  :: atomic { timeout && (owed == 0 || laSt == LA_CRASHED) && (laSt == LA_MOVED || laSt == LA_CANCELLED || laSt == LA_CRASHED) &&
              st >= RA_LOCKED && st <= RA_RELEASED ->
       if
       :: st == RA_RELEASED -> TR(RA_RELEASED, silence, RA_DONE); raHolding = false
       :: st == RA_LOCKED -> TR(RA_LOCKED, silence, RA_CANCELLED); raHolding = false; raOnNew = false
       :: st == RA_PATH -> TR(RA_PATH, silence, RA_CANCELLED); raHolding = false; raOnNew = false
       :: st == RA_DRAIN -> TR(RA_DRAIN, silence, RA_CANCELLED); raHolding = false; raOnNew = false
       :: st == RA_PROBING -> TR(RA_PROBING, silence, RA_CANCELLED); raHolding = false; raOnNew = false
       fi;
       raSt = st }
  :: atomic { REORDERING(cRA) }
  :: atomic { cRA?t, a ->
       if
       :: t == requestLock && st == RA_IDLE && !ended ->
            TR(RA_IDLE, requestLock, RA_LOCKED); raHolding = true; raDelta = a; SEND(cOLDL, ackLock, 0)
       :: t == requestLock && st != RA_IDLE && st != RA_CANCELLED && st != RA_DONE ->
#ifdef MUT_NACK_DUPLICATE
            SEND(cOLDL, nackLock, 0)
#else
            SEND(cOLDL, ackLock, 0)
#endif
       :: t == newPathSyn && st == RA_LOCKED -> TR(RA_LOCKED, newPathSyn, RA_PATH); SEND(cNEWL, newPathSynAck, 0)
       :: t == newPathSyn && st == RA_PATH -> SEND(cNEWL, newPathSynAck, 0)
       :: t == drainStart && st == RA_PATH ->
            TR(RA_PATH, drainStart, RA_DRAIN);
            if :: !HOLDS -> raOnNew = true :: else fi
       :: t == drainStart && (st == RA_DRAIN || st == RA_PROBING || st == RA_RELEASED) && drainedHere -> SEND(cLA, drained, 0)
       :: t == cancelLock ->
            ended = true;
            if
            :: st == RA_LOCKED -> TR(RA_LOCKED, cancelLock, RA_CANCELLED)
            :: st == RA_PATH -> TR(RA_PATH, cancelLock, RA_CANCELLED)
            :: st == RA_DRAIN -> TR(RA_DRAIN, cancelLock, RA_CANCELLED)
            :: st == RA_PROBING -> TR(RA_PROBING, cancelLock, RA_CANCELLED)
            :: st == RA_IDLE -> TR(RA_IDLE, cancelLock, RA_CANCELLED)      /* it never heard the lock: answer anyway */
            :: else -> skip
            fi;
            if :: st == RA_CANCELLED -> raHolding = false; raOnNew = false :: else fi;
            SEND(cOLDL, ackCancel, 0)
       :: t == oldPathFin ->
            ended = true;
            if
            :: st == RA_DRAIN -> TR(RA_DRAIN, oldPathFin, RA_DONE)         /* stateless */
            :: st == RA_PROBING -> TR(RA_PROBING, oldPathFin, RA_DONE)     /* our probe's answer was lost */
            :: st == RA_RELEASED -> TR(RA_RELEASED, oldPathFin, RA_DONE)
            :: else -> skip
            fi;
            if :: st == RA_DONE -> raHolding = false; raOnNew = true :: else fi;
            SEND(cOLDL, oldPathFinAck, 0)
       :: else -> skip
       fi;
       raSt = st }
  od
}

init {
  atomic {
    run LeftAnchor();
    if :: OLDBOXES -> run OldBox() :: !OLDBOXES && STATEFUL -> run Donor() :: else fi;
    if :: NEWBOXES -> run NewBox() :: else fi;
    run RightAnchor()
  }
  /* The end of every run: nobody can move, and no loss is left unanswered by the left anchor. */
  (timeout && (owed == 0 || laSt == LA_MOVED || laSt == LA_REFUSED || laSt == LA_CANCELLED || laSt == LA_CRASHED)
   && !OB_SILENCE && !RA_SILENCE);   /* and no silence timeout is still to fire */
  /* no deadlock: the reconfiguration ended */
  assert(laSt == LA_MOVED || laSt == LA_CANCELLED || laSt == LA_REFUSED || laSt == LA_CRASHED);
  /* every byte written is delivered, once (DELIVER), in order (unless the left end's host died) */
  assert(laSt == LA_CRASHED || (written == N && rcvNext == N));
  if
  :: laSt == LA_MOVED ->
       /* after success: the old path is torn down, every lock released, data on the new path */
       assert(!OLDBOXES || (obSt == OB_GONE && !obInSession));
       assert(raSt == RA_DONE && raOnNew && !raHolding);
       assert(!laLocked && egress == E_NEW && (nbInSession || !NEWBOXES));
       /* §3.4: both anchors took the sum of the removed boxes' deltas (the right anchor applied it to every byte
          in from the new path: DELIVER) */
       assert(raDelta == DW && laDelta == DW)
  :: laSt == LA_CANCELLED ->
       /* after cancel: the session is on the old path and unlocked */
       assert(egress == E_OLD && !laLocked);
       assert(!OLDBOXES || (obInSession && (obSt == OB_UNLOCKED || obSt == OB_ENDED)));
       assert(!raHolding && !raOnNew);
       /* newPathCancel is sent until answered and a late newPathSyn is refused (issue 19): no new box keeps the
          session (a box that is down never made it) */
       assert(!nbInSession)
  :: laSt == LA_CRASHED ->
       /* the left anchor's host died: the old box's lock and the right anchor's hold are given up after their
          silence timeouts (issue 19), so the segment is free for the next reconfiguration */
       assert(obSt != OB_PENDING && obSt != OB_LOCKED && obSt != OB_EXPORTING && obSt != OB_EXPORTED && obSt != OB_ANSWERED);
       assert(!raHolding)
  :: laSt == LA_REFUSED -> skip          /* a single request is never refused: the next assertion says so */
  fi;
  /* no unnecessary failure: with a live new path, an accepted import and no deadline, it succeeds */
  assert(pathFailed || importRefused || deadlineFired || laSt == LA_MOVED || laSt == LA_CRASHED)
}

/* LTL (pan -a -N <name>; model/verify.sh runs both in the replace-ltl configuration) */
/* once cancelled, the left anchor stays on the old path, unlocked */
ltl cancelledStaysOld { [] ((laSt == LA_CANCELLED) -> [] (egress == E_OLD && !laLocked)) }
/* once moved, the left anchor sends on the new path and holds no lock, for good */
ltl movedStaysNew { [] ((laSt == LA_MOVED) -> [] (egress == E_NEW && !laLocked)) }
