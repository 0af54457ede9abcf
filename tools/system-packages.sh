#!/usr/bin/env bash
# System packages the test suite needs, installed with apt when missing (as root), else named.
#   dnsmasq-base  a real DNS server for the sources-by-name tests (issue 19)
#   prometheus    a real Prometheus server that scrapes /metrics (issue 19)
#   iptables      a balancing address in a namespace, as kube-proxy does (issue 19)
#   libibverbs1   needed to import Mooncake TransferEngine, even for its TCP protocol (issue 20)
# Idempotent: a second run installs nothing and takes well under a second.
set -euo pipefail
PACKAGES=(dnsmasq-base prometheus iptables libibverbs1)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-packages: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})." \
       "The tests that need them skip, or fail under .ci/run." >&2
  exit 0
fi
echo "system-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
