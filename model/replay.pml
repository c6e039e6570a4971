/*
 * dysco-migrate: one session moved between two boxes again and again (issue 20), written for Spin.
 *
 * Path      : LA -> B1 -> RA at first; the operator's requests move it B1 -> B2, B2 -> B1, B1 -> B2, ... (OPS of
 *             them, one after the other: the next starts when the previous one's result is back).
 * Agents    : CTRL (the controller: the old box's agent, on the operator's replace), LA (the left anchor: it
 *             accepts a trigger, runs the reconfiguration and reports), B1 / B2 (boxes: the new box of one
 *             request, the old box that leaves in the next), ATK (an off-path host: it records every trigger
 *             on the segment and sends any recorded one again, REPLAY times, at any moment).
 * Abstracted: the reconfiguration itself is replace.pml's; here it is "newPathSyn to the new box, its answer,
 *             the old box leaves". What matters is what each agent remembers between requests.
 *
 * Freshness (docs/CONTROL-PROTOCOL.md "Freshness"): every message carries the sender's id (random per run),
 * a counter per receiver and the time it was sent; the receiver keeps a window per sender id and refuses a
 * counter it has seen, and refuses a message sent before it (the receiver) started. Modelled: CTRL's triggers
 * carry (id, counter, sent); LA keeps the window of the current id; CTRL may restart (RESTART_CTRL: a new id,
 * counters from 1 again) and LA may restart (RESTART_LA: windows and memory lost, its start time moves on).
 * Time is a counter that moves at LA's restart only (a replay is "sent" when it was first sent).
 *
 * Properties:
 *   P1 (a trigger is acted on only fresh): LA starts each request at most once, and only requests the
 *      operator made; no reconfiguration without the operator.
 *   P2 (no unnecessary failure, back to back): every operator request moves the session; at the end it is
 *      on the last request's box and no agent is mid-way.
 * Mutants: MUT_NO_FRESHNESS (LA takes any authenticated trigger), MUT_NO_TIME (LA does not refuse what was sent
 * before it started: after its restart, with its windows gone, a recorded trigger is taken again),
 * IMPL_KEEPS_NEWBOX (a box that leaves keeps its new-box role of an earlier request and ignores a later
 * request's newPathSyn: MigrationCoordinator before issue 20).
 */

#ifndef OPS
#define OPS 3
#endif
#ifndef REPLAY
#define REPLAY 2
#endif
#ifndef RESTART_CTRL
#define RESTART_CTRL 1
#endif
#ifndef RESTART_LA
#define RESTART_LA 1
#endif
#define MAXC 8

mtype = { trigger, result, newPathSyn, newPathSynAck, leave };

/* trigger: (request, target box, sender id, counter, sent); result: (request, outcome 1 moved 2 cancelled 3 refused) */
chan toLA = [4] of { mtype, byte, byte, byte, byte, byte };
chan toCTRL = [2] of { mtype, byte, byte, byte, byte, byte };
chan toBox[3] = [2] of { mtype, byte, byte, byte, byte, byte };

byte box = 1;                 /* the box the session crosses: 1 or 2 */
byte started[OPS + 1];        /* times LA started request k */
byte outcome[OPS + 1];        /* 0 none, 1 moved, 2 cancelled */
bool requested[OPS + 1];      /* the operator asked for request k */
byte clock = 1;               /* time: moves at LA's restart */

/* the attacker's recording of the segment (triggers only: what starts a lock round) */
byte recN = 0;
byte recReq[6]; byte recTo[6]; byte recId[6]; byte recC[6]; byte recT[6];

proctype CTRL() {
    byte k = 1, target, id = 1, c = 0, r, t, x, y;
    do
    :: k <= OPS ->
        target = (k % 2 == 1 -> 2 : 1);
        requested[k] = true;
send:
        c++;
        atomic {  /* sent, and recorded on the segment as it was sent */
            toLA ! trigger(k, target, id, c, clock);
            if :: recN < 6 -> recReq[recN] = k; recTo[recN] = target; recId[recN] = id; recC[recN] = c;
                              recT[recN] = clock; recN++ :: else -> skip fi
        }
        do
        :: toCTRL ? result(r, t, x, y, _) ->
            if
            :: r == k -> outcome[k] = t; k++; break
            :: else -> skip  /* a late result of an earlier request */
            fi
        :: timeout && c < MAXC -> goto send  /* the controller retransmits its trigger (a new counter: a fresh message) */
#if RESTART_CTRL
        :: id == 1 ->
            /* the controller's agent restarts: a new sender id, counters from 1; the operator asks again */
            id = 2; c = 0;
            goto send
#endif
        od
    :: k > OPS -> break
    od;
    /* P2: every operator request moved, back to back; the session is on the last request's box */
    k = 1;
    do
    :: k <= OPS -> assert(outcome[k] == 1); k++
    :: k > OPS -> break
    od;
    assert(box == (OPS % 2 == 1 -> 2 : 1))
}

proctype ATK() {
    byte n = 0, i;
    do
    :: n < REPLAY && recN > 0 ->
        atomic {
            select(i : 0 .. recN - 1);
            toLA ! trigger(recReq[i], recTo[i], recId[i], recC[i], recT[i]);
            n++
        }
    :: n >= REPLAY -> break
    od
}

proctype LA() {
    byte k, to, id, c, t, r, sub;
    int seen[3];                  /* the window of each sender id (1, 2): the counters seen (bit c) */
    byte startedAt = 1;
    byte lastReq = 0, lastOutcome = 0;  /* the last finished request and its result (`finished`) */
end_idle:
    do
    :: toLA ? trigger(k, to, id, c, t) ->
        sub = id;
#ifndef MUT_NO_FRESHNESS
#ifndef MUT_NO_TIME
        if :: t < startedAt -> goto end_idle :: else -> skip fi
#endif
        if
        :: (seen[sub] & (1 << c)) != 0 -> goto end_idle  /* a copy: replayed */
        :: else -> seen[sub] = seen[sub] | (1 << c)
        fi
#endif
        if
        :: k == lastReq -> toCTRL ! result(k, lastOutcome, 0, 0, 0)  /* a duplicate trigger: the same answer */
        :: k != lastReq && to == box -> toCTRL ! result(k, 3, 0, 0, 0)  /* not a replacement of the path: refused, no lock */
        :: k != lastReq && to != box ->
            /* P1: every reconfiguration is one the operator asked for, started once */
            assert(requested[k] && started[k] == 0);
            started[k]++;
            toBox[to] ! newPathSyn(k, to, 0, 0, 0);
            if
            :: toLA ?? newPathSynAck(r, _, _, _, _) ->
                assert(r == k);
                toBox[box] ! leave(k, box, 0, 0, 0);  /* teardown: the old box leaves */
                box = to;
                lastReq = k; lastOutcome = 1
            :: timeout ->
                /* the new box stays silent: the deadline cancels (the session stays where it is) */
                lastReq = k; lastOutcome = 2
            fi;
            toCTRL ! result(k, lastOutcome, 0, 0, 0)
        fi
#if RESTART_LA
    :: startedAt == 1 ->
        /* LA's agent restarts: its windows and its memory are gone; it started later than anything sent so far */
        atomic { clock++; startedAt = clock; seen[1] = 0; seen[2] = 0; lastReq = 0; lastOutcome = 0 }
#endif
    od
}

proctype Box(byte me) {
    byte k, r;
    byte newBoxOf = 0;  /* the request this box joined the session for as a new box (MigrationCoordinator.newBoxes) */
end_box:
    do
    :: toBox[me] ? newPathSyn(k, _, _, _, _) ->
        if
        :: newBoxOf != 0 && newBoxOf != k -> skip  /* silent: a newPathSyn of another request (the old guard) */
        :: else -> newBoxOf = k; toLA ! newPathSynAck(k, me, 0, 0, 0)
        fi
    :: toBox[me] ? leave(k, _, _, _, _) ->
#ifndef IMPL_KEEPS_NEWBOX
        newBoxOf = 0  /* issue 20: leaving the session ends the new-box role of an earlier request */
#else
        skip
#endif
    od
}

init {
    atomic {
        run LA(); run CTRL(); run ATK(); run Box(1); run Box(2)
    }
}
