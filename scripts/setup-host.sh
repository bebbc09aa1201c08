#!/usr/bin/env bash
# Prepares a Debian 12 host for Shadowplane development, demos and tests.
# Idempotent: every step checks before it acts, so running it twice is cheap and safe.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "setup-host.sh must run as root: it installs apt packages, links kernel headers and mounts tracefs." >&2
  exit 1
fi

# --- apt packages -------------------------------------------------------------------------------
mapfile -t PKGS < <(grep -v '^\s*#' scripts/apt-packages.txt | awk 'NF {print $1}')
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # keepalived and bind9 are installed for tests/benchmarks only; never let their units start on install.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
  # keepalived, named and prometheus are tools for tests and benchmarks here, not services of this host
  if [ -d /run/systemd/system ]; then
    systemctl disable --now keepalived named prometheus >/dev/null 2>&1 || true
  fi
fi

# --- kernel headers for bcc ----------------------------------------------------------------------
# bcc compiles its programs against /lib/modules/$(uname -r)/{build,source}. Debian ships headers for its
# own kernel only; when the running kernel has none, link Debian's newest headers. TRACEPOINT_PROBE reads
# tracepoint layouts from tracefs at run time, so the version mismatch does not matter for our programs.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  arch_hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$arch_hdr" ]; then
    echo "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64" >&2; exit 1
  fi
  common_hdr=${arch_hdr%-amd64}-common
  say "linking $arch_hdr as the headers of kernel $(uname -r)"
  mkdir -p "$KDIR"
  ln -sfn "$arch_hdr" "$KDIR/build"
  [ -d "$common_hdr" ] && ln -sfn "$common_hdr" "$KDIR/source"
fi

# --- tracefs -------------------------------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ]; then
  say "mounting tracefs at /sys/kernel/tracing"
  mount -t tracefs tracefs /sys/kernel/tracing
fi

# --- the virtualenv ------------------------------------------------------------------------------
# Built on Debian's python3 so that Debian's bcc (a pure-Python binding over libbcc) imports unchanged.
PY=/usr/bin/python3
VENV=$ROOT/.venv
stamp_want=$(cat pyproject.toml requirements.lock scripts/setup-host.sh | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.shadowplane-stamp" 2>/dev/null)" != "$stamp_want" ]; then
  say "building $VENV"
  [ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -c requirements.lock -e ".[dev,train,systemd]"
  echo "$stamp_want" > "$VENV/.shadowplane-stamp"
fi
"$VENV/bin/python" -c 'import bcc, grpc, onnxruntime' || { echo "venv is incomplete" >&2; exit 1; }
say "host ready: $VENV"
