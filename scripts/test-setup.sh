#!/usr/bin/env bash
# System packages the integration tests use (real Prometheus, ...), installed when missing.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# The demo page's end-to-end test (tests/test_demo.py): headless Chromium driven by Selenium
# through Debian's chromedriver (no browser download), and a font to draw its text with.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# The images, built and run for real (tests/test_images.py, scripts/build-images.sh): podman with
# runc as root (no Docker engine, no registry), and mmdebstrap for the Debian base image.
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
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
