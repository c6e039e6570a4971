/*
 * dysco-migrate: contention over overlapping segments (paper §3.2, figure 5), written for Spin.
 *
 * Chain A0 - A1 - A2 - A3. Request 1: left anchor A0, right anchor A2 (replaces A1).
 *                          Request 2: left anchor A1, right anchor A3 (replaces A2).
 * They overlap on the subsession A1 -> A2, whose lock A1 keeps. Each agent i < 3 keeps the lock of its right
 * subsession (SegmentLock: unlocked, lockPending(owner, held), locked(owner)). Each left anchor is triggered
 * once, at any moment; a request that wins the lock then either completes (oldPathFin / oldPathFinAck: the
 * replaced box leaves the session, every lock goes) or is cancelled (cancelLock / ackCancel, §3.6), chosen
 * nondeterministically (a failed new path). Control messages are lost (LOSS), duplicated (DUP), reordered
 * (REORDER); left anchors retransmit. Transitions: TR(FROM, event, TO) rows of model/transitions.tsv (role OP).
 */

#ifndef LOSS
#define LOSS 1
#endif
#ifndef DUP
#define DUP 1
#endif
#ifndef REORDER
#define REORDER 1
#endif
#ifndef CANCEL
#define CANCEL 1
#endif
#define CAP 6

#define TR(f, e, t) assert(lk[me] == f); lk[me] = t

mtype = { requestLock, ackLock, nackLock, cancelLock, ackCancel, oldPathFin, oldPathFinAck };

/* SegmentLock states (role OP: the agent on the left of a subsession) */
#define OP_UNLOCKED 1
#define OP_PENDING 2
#define OP_LOCKED 3

/* left anchor results */
#define R_NONE 0
#define R_WAIT 1
#define R_MOVED 2
#define R_REFUSED 3
#define R_CANCELLED 4
#define R_LOCKED 5
#define R_TEARDOWN 6
#define R_CANCEL 7

/* a request operates on its segment (the reconfiguration proper, or its teardown) */
#define operating(r) (result[r] == R_LOCKED || result[r] == R_TEARDOWN)

chan in[4] = [CAP] of { mtype, byte };
byte lk[4], own[4], held[4];
bool inSession[4], ended[4 * 3];        /* ended[agent * 3 + request]: cancelled or torn down here */
bool refused[4 * 3];                     /* refused (or its refusal passed on) here: refuse its duplicates again */
byte result[3];                          /* per request, at its left anchor */
bool won[3], cancelledEarly[3];
byte loss = LOSS, dup = DUP, reord = REORDER;
byte owed[3];                            /* losses of messages of request r not yet answered by a retransmission */
byte raOf[3], laOf[3];

/* An agent that refuses or passes on a refusal of request r remembers it, so that a late duplicate of its
   requestLock cannot lock the segment again for nobody, and refuses that duplicate again (idempotent). (MigrationCoordinator remembers only cancelled and
   torn-down requests: -DIMPL_FORGETS_REFUSED shows what that costs; docs/VERIFICATION.md.) */
#ifdef IMPL_FORGETS_REFUSED
#define REFUSED_HERE(r) skip
#else
#define REFUSED_HERE(r) refused[me * 3 + r] = true
#endif

inline SEND(to, t, r) {
  if
  :: loss > 0 -> loss--; owed[r]++
  :: in[to]!t, r
  :: dup > 0 -> dup--; in[to]!t, r; in[to]!t, r
  fi
}

/* the pending request ended (refused, cancelled): the held one is pending now, and goes on to the right */
#ifdef MUT_HELD_FORGOTTEN
#define FORWARD_HELD() own[me] = 0; held[me] = 0; lk[me] = OP_UNLOCKED
#else
#define FORWARD_HELD() own[me] = held[me]; held[me] = 0; SEND(me + 1, requestLock, own[me])
#endif

proctype Agent(byte me) {
  mtype t; byte r, o, x;
  bool triggered;
  bool willCancel;                       /* chosen at the trigger: this request's deadline passes during the lock */
end:
  do
  /* ---- trigger (at its left anchor, once, at any moment) */
  :: atomic { (me == 0 || me == 1) && !triggered -> triggered = true; r = me + 1;
       if :: CANCEL -> willCancel = true :: true -> skip fi;
       if
       :: !inSession[me] -> result[r] = R_REFUSED       /* the session is not here any more */
       :: inSession[me] && lk[me] == OP_UNLOCKED -> TR(OP_UNLOCKED, trigger, OP_PENDING); own[me] = r;
            result[r] = R_WAIT; SEND(me + 1, requestLock, r)
       :: inSession[me] && lk[me] != OP_UNLOCKED -> result[r] = R_REFUSED   /* refused at once, lock unchanged */
       fi }
  /* ---- retransmission of the left anchor's outstanding message */
  :: atomic { timeout && (me == 0 || me == 1) && triggered && owed[me + 1] > 0 ->
       r = me + 1;
       if
       :: result[r] == R_WAIT -> owed[r]--; SEND(me + 1, requestLock, r)
       :: result[r] == R_CANCEL -> owed[r]--; SEND(me + 1, cancelLock, r)
       :: result[r] == R_TEARDOWN -> owed[r]--; SEND(me + 1, oldPathFin, r)
       :: else -> skip
       fi }
  /* ---- the deadline passes while the lock is under way: cancel */
  :: atomic { (me == 0 || me == 1) && willCancel && result[me + 1] == R_WAIT -> r = me + 1;
       result[r] = R_CANCEL; cancelledEarly[r] = true; SEND(me + 1, cancelLock, r) }
  /* ---- the winner goes on: teardown after a successful reconfiguration, or cancel */
  :: atomic { (me == 0 || me == 1) && result[me + 1] == R_LOCKED -> r = me + 1;
       if
       :: result[r] = R_TEARDOWN; SEND(me + 1, oldPathFin, r)
       :: CANCEL -> result[r] = R_CANCEL; SEND(me + 1, cancelLock, r)
       fi }
  :: atomic { reord > 0 && len(in[me]) > 1 -> reord--; in[me]?t, r; in[me]!t, r }
  :: atomic { in[me]?t, r ->
       if
       :: !inSession[me] -> owed[r]++         /* left the session: dropped (unknown session), as a loss */
       :: else ->
       if
       /* ---------------- requestLock travelling right */
       :: t == requestLock && ended[me * 3 + r] -> skip
       :: t == requestLock && !ended[me * 3 + r] && refused[me * 3 + r] -> SEND(me - 1, nackLock, r)
       :: t == requestLock && !ended[me * 3 + r] && !refused[me * 3 + r] && raOf[r] == me -> SEND(me - 1, ackLock, r)
       :: t == requestLock && !ended[me * 3 + r] && !refused[me * 3 + r] && raOf[r] != me ->
            if
            :: lk[me] == OP_UNLOCKED -> TR(OP_UNLOCKED, requestLock, OP_PENDING); own[me] = r; SEND(me + 1, requestLock, r)
            :: lk[me] == OP_PENDING && own[me] == r -> SEND(me + 1, requestLock, r)       /* forwardDuplicate */
            :: lk[me] == OP_PENDING && own[me] != r && (held[me] == r || held[me] == 0) -> held[me] = r   /* held */
            :: lk[me] == OP_PENDING && own[me] != r && held[me] != r && held[me] != 0 -> REFUSED_HERE(r); SEND(me - 1, nackLock, r)
            :: lk[me] == OP_LOCKED && own[me] == r -> SEND(me - 1, ackLock, r)            /* ackAgain */
            :: lk[me] == OP_LOCKED && own[me] != r ->
#ifdef MUT_LOCKED_ACKS
                 SEND(me - 1, ackLock, r)          /* a locked subsession grants the request too */
#else
                 REFUSED_HERE(r); SEND(me - 1, nackLock, r)
#endif
            fi
       /* ---------------- ackLock travelling left */
       :: t == ackLock ->
            if
            :: lk[me] == OP_PENDING && own[me] == r ->
                 TR(OP_PENDING, ackLock, OP_LOCKED);
                 if :: held[me] != 0 -> o = held[me]; held[me] = 0; REFUSED_HERE(o); SEND(me - 1, nackLock, o) :: else fi;
                 if
                 :: laOf[r] == me && result[r] == R_CANCEL -> skip     /* cancelled meanwhile: locked until ackCancel */
                 :: laOf[r] == me && result[r] != R_CANCEL -> won[r] = true; result[r] = R_LOCKED;
                      /* the winner owns every subsession of its segment; the other request does not operate */
#ifndef LTL_ONLY
                      assert(!operating(3 - r));
                      for (x : laOf[r] .. raOf[r] - 1) { assert(lk[x] == OP_LOCKED && own[x] == r) }
#endif
                 :: else -> SEND(me - 1, ackLock, r)
                 fi
            :: lk[me] == OP_LOCKED && own[me] == r && laOf[r] != me -> SEND(me - 1, ackLock, r)
            :: else -> skip
            fi
       /* ---------------- nackLock travelling left */
       :: t == nackLock ->
            if
            :: lk[me] == OP_PENDING && own[me] == r ->
                 if
                 :: held[me] != 0 -> TR(OP_PENDING, nackLock, OP_PENDING); FORWARD_HELD()
                 :: else -> TR(OP_PENDING, nackLock, OP_UNLOCKED); own[me] = 0
                 fi;
                 if
                 :: laOf[r] == me && result[r] == R_CANCEL -> skip
                 :: laOf[r] == me && result[r] != R_CANCEL -> result[r] = R_REFUSED
                 :: laOf[r] != me -> REFUSED_HERE(r); SEND(me - 1, nackLock, r)
                 fi
            :: else -> skip
            fi
       /* ---------------- cancelLock travelling right */
       :: t == cancelLock ->
            ended[me * 3 + r] = true;
            if
            :: raOf[r] == me -> SEND(me - 1, ackCancel, r)
            :: raOf[r] != me && lk[me] == OP_PENDING && held[me] == r -> held[me] = 0; SEND(me - 1, ackCancel, r)  /* withdraw */
            :: raOf[r] != me && own[me] == r && lk[me] != OP_UNLOCKED ->
                 if
                 :: lk[me] == OP_LOCKED -> TR(OP_LOCKED, cancelLock, OP_UNLOCKED); own[me] = 0
#ifdef MUT_CANCEL_KEEPS_LOCK
                      ; lk[me] = OP_LOCKED; own[me] = r
#endif
                 :: lk[me] == OP_PENDING && held[me] == 0 -> TR(OP_PENDING, cancelLock, OP_UNLOCKED); own[me] = 0
                 :: lk[me] == OP_PENDING && held[me] != 0 -> TR(OP_PENDING, cancelLock, OP_PENDING); FORWARD_HELD()
                 fi;
                 if :: laOf[r] != me -> SEND(me + 1, cancelLock, r) :: else fi
            :: raOf[r] != me && !(own[me] == r && lk[me] != OP_UNLOCKED) && !(lk[me] == OP_PENDING && held[me] == r) ->
                 SEND(me + 1, cancelLock, r)
            fi
       :: t == ackCancel ->
            if
            :: laOf[r] == me && result[r] == R_CANCEL ->
                 if
                 :: own[me] == r && lk[me] == OP_LOCKED -> TR(OP_LOCKED, ackCancel, OP_UNLOCKED); own[me] = 0
                 :: own[me] == r && lk[me] == OP_PENDING && held[me] == 0 -> TR(OP_PENDING, ackCancel, OP_UNLOCKED); own[me] = 0
                 :: own[me] == r && lk[me] == OP_PENDING && held[me] != 0 -> TR(OP_PENDING, ackCancel, OP_PENDING); FORWARD_HELD()
                 :: else
                 fi;
                 result[r] = R_CANCELLED
            :: laOf[r] == me && result[r] != R_CANCEL -> skip
            :: laOf[r] != me -> SEND(me - 1, ackCancel, r)
            fi
       /* ---------------- teardown */
       :: t == oldPathFin ->
            if
            :: raOf[r] == me -> ended[me * 3 + r] = true; SEND(me - 1, oldPathFinAck, r)
            :: else -> SEND(me + 1, oldPathFin, r)
            fi
       :: t == oldPathFinAck ->
            if
            :: laOf[r] == me && result[r] == R_TEARDOWN ->
                 TR(OP_LOCKED, oldPathFinAck, OP_UNLOCKED); own[me] = 0;
#ifdef MUT_KEEP_LOCK
                 lk[me] = OP_LOCKED; own[me] = r;
#endif
                 result[r] = R_MOVED
            :: laOf[r] == me && result[r] != R_TEARDOWN -> skip
            :: laOf[r] != me ->
                 /* an agent of the old path between the anchors leaves the session; its lock goes with it */
                 inSession[me] = false; lk[me] = OP_UNLOCKED; own[me] = 0; held[me] = 0; SEND(me - 1, oldPathFinAck, r)
            fi
       fi
       fi }
  od
}

init {
  atomic {
    laOf[1] = 0; raOf[1] = 2; laOf[2] = 1; raOf[2] = 3;
    byte i;
    for (i : 0 .. 3) { lk[i] = OP_UNLOCKED; inSession[i] = true }
    run Agent(0); run Agent(1); run Agent(2); run Agent(3)
  }
  (timeout && (owed[1] + owed[2] == 0 || (result[1] >= R_MOVED && result[1] <= R_CANCELLED && result[2] >= R_MOVED && result[2] <= R_CANCELLED)));
  /* no deadlock: both requests ended */
  assert(result[1] == R_MOVED || result[1] == R_REFUSED || result[1] == R_CANCELLED);
  assert(result[2] == R_MOVED || result[2] == R_REFUSED || result[2] == R_CANCELLED);
  /* exactly one winner: without cancels exactly one request locks its segment (and moves); with them, at
     least one does, and a second only after the first released (checked where it wins, and by ltl mutex) */
  assert(won[1] || won[2] || cancelledEarly[1] || cancelledEarly[2]);
  assert(CANCEL || won[1] != won[2] && (result[1] == R_MOVED || result[2] == R_MOVED));
  assert(!(result[1] == R_MOVED && result[2] == R_MOVED));
  /* every lock released (an agent that left the session keeps none) */
  assert(lk[0] == OP_UNLOCKED && lk[1] == OP_UNLOCKED && lk[2] == OP_UNLOCKED && held[1] == 0);
  /* success: the replaced box left the session */
  assert(result[1] != R_MOVED || !inSession[1]);
  assert(result[2] != R_MOVED || !inSession[2])
}

/* mutual exclusion over the overlapping segment, as LTL (pan -a -N mutex); -DLTL_ONLY drops the same check made
   where a request wins, so that a mutant shows the LTL claim catching it on its own */
ltl mutex { [] !(operating(1) && operating(2)) }
