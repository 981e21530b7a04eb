#!/usr/bin/env bash
# System packages the integration tests use (real Prometheus, ...), installed when missing.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    # Only the tests that need them fail (and say so); the rest of the suite still runs.
    echo "test-setup: WARNING: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
