#!/usr/bin/env bash
# Installs every system package dysco-migrate needs (idempotent). Run as root on Debian 12.
set -euo pipefail
PACKAGES=(
  pkg-config
  libnetfilter-queue-dev libnetfilter-conntrack-dev libnfnetlink-dev libmnl-dev
  libbpf-dev bpftool ethtool
  iptables conntrack iproute2 iperf3 curl python3 python3-scapy python3-matplotlib procps iputils-ping haproxy
  spin gcc
  dpkg-dev lintian systemd binutils debootstrap
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} system packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: need root to install: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: installed ${missing[*]}"
