#!/usr/bin/env bash
# retrans-probe.sh — measure TCP retransmissions (and their causes) in a lab without any migration.
#
# For each variant a fresh lab is built (client1 → fw1 → server1, fw2 idle), then each load runs REPEATS times;
# every run prints one row of counter deltas:
#   server1: TcpRetransSegs, TcpExtTCPFastRetrans, TcpExtTCPLossProbes, TcpExtTCPTimeouts (RTO),
#            TcpExtTCPSACKReorder, TcpExtTCPDSACKRecv (blocks), TcpExtTCPDSACKRecvSegs, and Retr - DSACKRecvSegs
#            (retransmissions the receiver did not report as duplicates; approximate under heavy reordering)
#   client1: TcpExtTCPOFOQueue, TcpExtTCPDSACKOldSent, TcpExtTCPDSACKOfoSent
#   drops:   sum of nfnetlink_queue queue_dropped+user_dropped over the lab's namespaces, tx/rx_dropped of every
#            veth (hosts' eth0 and the bridge ports in NAME-sw), fw1 IpInDiscards+IpOutDiscards, fw1 INVALID rule,
#            softnet backlog drops (/proc/net/softnet_stat, machine-wide)
#
# Variants:  noagents   --no-agents --route-via fw1 (kernel forwarding through fw1 and its firewall)
#            default    agents, fast path on (hand-over after 8 packets)
#            nofastpath --agent-arg=--no-fastpath
#            never      --agent-arg=--fastpath-after --agent-arg=1000000
#            afterN     --agent-arg=--fastpath-after --agent-arg=N (hand over after N packets)
# Loads:     curl4m     3 parallel `curl --limit-rate 4M` of a 20 MiB file (port 80)
#            curlfull   3 parallel curl at full speed
#            iperf      iperf3 -c server1 -t SECONDS        (client → server)
#            iperfR     iperf3 -c server1 -t SECONDS -R     (server → client)
#
# Usage: scripts/retrans-probe.sh [--name rtx1] [--subnet 10.79.50.0/24] [--variants noagents,default,...]
#                                 [--loads curl4m,curlfull,iperf,iperfR] [--repeats 3] [--seconds 3]
#                                 [--existing] [--keep] [--rps MASK] [--sysctl K=V]... [--quickack]
#   --existing  use the lab NAME as it is (no up/down, one pseudo-variant "existing")
#   --keep      leave the last lab up
#   --rps MASK  write MASK (hex CPU mask, e.g. 3) to rps_cpus of every port of the lab's switch (NAME-sw): each flow's
#               packets then enter one CPU's backlog (without RPS, veth's netif_rx queues a packet on the *sending*
#               CPU's backlog, and a flow sent from two CPUs is reordered)
#   --sysctl K=V  set a sysctl in every host namespace (repeatable), e.g. net.ipv4.tcp_congestion_control=cubic,
#               net.ipv4.tcp_early_retrans=0 (no TLP)
#   --quickack  `ip route change ... quickack 1` on every route of client1 and server1 (no delayed ACKs)
# Examples:
#   scripts/retrans-probe.sh                         the four variants as built today
#   scripts/retrans-probe.sh --rps 3 --quickack      the same with flow-steered switch ports and no delayed ACKs
# Needs root, the release binary (.build/release/dysco-migrate), curl, iperf3, nstat.
set -euo pipefail

NAME=rtx1
SUBNET=10.79.50.0/24
VARIANTS=noagents,default,nofastpath,never
LOADS=curl4m,curlfull,iperf,iperfR
REPEATS=3
SECONDS_RUN=3
EXISTING=0
KEEP=0
RPS=""
SYSCTLS=()
QUICKACK=0
BIN="$(cd "$(dirname "$0")/.." && pwd)/.build/release/dysco-migrate"

while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME=$2; shift 2 ;;
        --subnet) SUBNET=$2; shift 2 ;;
        --variants) VARIANTS=$2; shift 2 ;;
        --loads) LOADS=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --seconds) SECONDS_RUN=$2; shift 2 ;;
        --existing) EXISTING=1; shift ;;
        --keep) KEEP=1; shift ;;
        --binary) BIN=$2; shift 2 ;;
        --rps) RPS=$2; shift 2 ;;
        --sysctl) SYSCTLS+=("$2"); shift 2 ;;
        --quickack) QUICKACK=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ -x "$BIN" ] || { echo "missing $BIN (swift build -c release --product dysco-migrate)" >&2; exit 1; }

BASE=${SUBNET%.0/24}
SERVER=$BASE.201
NSS=(client1 fw1 fw2 server1)

ns() { echo "$NAME-$1"; }

SRV_KEYS=(TcpRetransSegs TcpExtTCPFastRetrans TcpExtTCPLossProbes TcpExtTCPTimeouts TcpExtTCPSACKReorder
          TcpExtTCPDSACKRecv TcpExtTCPDSACKRecvSegs)
CLI_KEYS=(TcpExtTCPOFOQueue TcpExtTCPDSACKOldSent TcpExtTCPDSACKOfoSent)

# One snapshot: "key value" lines.
snapshot() {
    local h k
    for h in server1 client1; do
        ip netns exec "$(ns $h)" nstat -asz | awk -v h=$h '!/^#/ {print h"."$1, $2}'
    done
    # nfnetlink_queue: columns 6 (queue_dropped) and 7 (user_dropped)
    for h in "${NSS[@]}"; do
        ip netns exec "$(ns $h)" cat /proc/net/netfilter/nfnetlink_queue 2>/dev/null |
            awk -v h=$h '{q+=$6; u+=$7} END {print "nfq.qdrop", q+0; print "nfq.udrop", u+0}'
    done | awk '{s[$1]+=$2} END {for (k in s) print k, s[k]}'
    # veth drops: hosts' eth0 and the bridge ports
    {
        for h in "${NSS[@]}"; do
            ip -n "$(ns $h)" -s -s -j link show dev eth0 2>/dev/null || true
        done
        ip -n "$(ns sw)" -s -s -j link show 2>/dev/null || true
    } | python3 -c '
import json, sys
rx = tx = 0
for line in sys.stdin:
    line = line.strip()
    if not line: continue
    for l in json.loads(line):
        s = l.get("stats64", {})
        rx += s.get("rx", {}).get("dropped", 0); tx += s.get("tx", {}).get("dropped", 0)
print("veth.rxdrop", rx); print("veth.txdrop", tx)'
    ip netns exec "$(ns fw1)" nstat -asz IpInDiscards IpOutDiscards | awk '!/^#/ {s+=$2} END {print "fw1.ipdiscard", s+0}'
    ip netns exec "$(ns fw1)" iptables -w -L FORWARD -v -n -x 2>/dev/null |
        awk '/INVALID/ {p+=$1} END {print "fw1.invalid", p+0}'
    python3 -c 'print("softnet.drop", sum(int(l.split()[1], 16) for l in open("/proc/net/softnet_stat")))' 
}

# delta BEFORE AFTER KEY
delta() { awk -v k="$3" 'FNR==NR {if ($1==k) b=$2; next} $1==k {a=$2} END {print a-b}' "$1" "$2"; }

header() {
    printf '%-11s %-8s %2s | %5s %5s %4s %4s %5s %5s %6s %5s | %5s %5s %4s | %4s %4s %4s %4s %4s | %s\n' \
        variant load "#" Retr Fast TLP RTO SACKr DSACK DSsegs NotDS OFOQ DSold DSofo nfq veth fwdis inval snet goodput
}

run_load() { # load -> prints goodput summary
    local load=$1 out
    case "$load" in
        curl4m|curlfull)
            local rate=(); [ "$load" = curl4m ] && rate=(--limit-rate 4M)
            out=$(for i in 1 2 3; do
                ip netns exec "$(ns client1)" curl -s -o /dev/null "${rate[@]}" -w '%{speed_download}\n' \
                    "http://$SERVER/big.bin" &
            done; wait)
            echo "$out" | awk '{s+=$1} END {printf "%.1f MB/s (3 flows)", s/1e6}' ;;
        iperf|iperfR)
            local r=(); [ "$load" = iperfR ] && r=(-R)
            out=$(ip netns exec "$(ns client1)" iperf3 -c "$SERVER" -t "$SECONDS_RUN" "${r[@]}" -J)
            echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); e=j["end"]
print("%.2f Gbit/s iperf3-retr=%d" % (e["sum_received"]["bits_per_second"]/1e9, e["sum_sent"].get("retransmits", -1)))' ;;
        *) echo "unknown load $load" >&2; return 1 ;;
    esac
}

measure_variant() {
    local variant=$1 load r b a gp
    b=$(mktemp); a=$(mktemp)
    for load in ${LOADS//,/ }; do
        for r in $(seq 1 "$REPEATS"); do
            snapshot > "$b"
            gp=$(run_load "$load")
            sleep 0.3
            snapshot > "$a"
            local v=()
            for k in "${SRV_KEYS[@]}"; do v+=("$(delta "$b" "$a" server1.$k)"); done
            v+=("$(( v[0] - v[6] ))")
            for k in "${CLI_KEYS[@]}"; do v+=("$(delta "$b" "$a" client1.$k)"); done
            local nfq=$(( $(delta "$b" "$a" nfq.qdrop) + $(delta "$b" "$a" nfq.udrop) ))
            local veth=$(( $(delta "$b" "$a" veth.rxdrop) + $(delta "$b" "$a" veth.txdrop) ))
            printf '%-11s %-8s %2s | %5s %5s %4s %4s %5s %5s %6s %5s | %5s %5s %4s | %4s %4s %4s %4s %4s | %s\n' \
                "$variant" "$load" "$r" "${v[@]}" "$nfq" "$veth" "$(delta "$b" "$a" fw1.ipdiscard)" \
                "$(delta "$b" "$a" fw1.invalid)" "$(delta "$b" "$a" softnet.drop)" "$gp"
        done
    done
    rm -f "$b" "$a"
}

lab_up() { # variant
    local args=()
    case "$1" in
        noagents) args=(--no-agents --route-via fw1) ;;
        default) args=() ;;
        nofastpath) args=(--agent-arg=--no-fastpath) ;;
        never) args=(--agent-arg=--fastpath-after --agent-arg=1000000) ;;
        after[0-9]*) args=(--agent-arg=--fastpath-after --agent-arg="${1#after}") ;;
        *) echo "unknown variant $1" >&2; return 1 ;;
    esac
    local log="/tmp/retrans-probe-$NAME.log"
    "$BIN" lab up --name "$NAME" --middleboxes fw1,fw2 --subnet "$SUBNET" ${args[@]+"${args[@]}"} > "$log" 2>&1 ||
        { cat "$log" >&2; return 1; }
    tweak
    head -c $((20 * 1024 * 1024)) /dev/urandom > "/run/dysco-migrate/labs/$NAME/www/big.bin"
}

tweak() { # the --rps/--sysctl/--quickack changes, on the lab as it is
    local h f r
    if [ -n "$RPS" ]; then
        ip netns exec "$(ns sw)" sh -c "for f in /sys/class/net/*/queues/rx-*/rps_cpus; do echo $RPS > \$f; done"
    fi
    for h in "${NSS[@]}"; do
        for f in ${SYSCTLS[@]+"${SYSCTLS[@]}"}; do ip netns exec "$(ns $h)" sysctl -q -w "$f"; done
    done
    if [ "$QUICKACK" = 1 ]; then
        for h in client1 server1; do
            ip -n "$(ns $h)" route show | while read -r r; do
                [[ "$r" == *quickack* ]] || ip -n "$(ns $h)" route change $r quickack 1
            done
        done
    fi
}

lab_down() { "$BIN" lab down --name "$NAME" > /dev/null 2>&1 || true; }

echo "# $(date -Is) lab=$NAME subnet=$SUBNET cc=$(cat /proc/sys/net/ipv4/tcp_congestion_control) load=$(cut -d' ' -f1-3 /proc/loadavg)"
echo "# tweaks: rps=${RPS:-none} sysctl=${SYSCTLS[*]:-none} quickack=$QUICKACK"
echo "# server1: Retr=TcpRetransSegs Fast=TCPFastRetrans TLP=TCPLossProbes RTO=TCPTimeouts SACKr=TCPSACKReorder DSACK=TCPDSACKRecv (blocks) DSsegs=TCPDSACKRecvSegs NotDS=Retr-DSsegs (retransmissions not proven spurious)"
echo "# client1: OFOQ=TCPOFOQueue DSold=TCPDSACKOldSent DSofo=TCPDSACKOfoSent; drops: nfq=nfnetlink_queue dropped, veth=veth rx+tx dropped, fwdis=fw1 IpIn/OutDiscards, inval=fw1 INVALID, snet=softnet backlog (machine-wide)"
header
if [ "$EXISTING" = 1 ]; then
    tweak
    measure_variant existing
else
    trap lab_down EXIT
    for variant in ${VARIANTS//,/ }; do
        lab_down
        lab_up "$variant"
        sleep 1
        measure_variant "$variant"
    done
    if [ "$KEEP" = 1 ]; then trap - EXIT; fi
fi
