#!/usr/bin/env bash
# Install Debian's chromium (the headless browser of tests/test_report.py) when it is missing.
#
# Called by .ci/run before the tests. Where it cannot be installed (no apt-get, not root and no
# password-less sudo, no network) it says so and exits 0: the browser tests then skip with a message
# naming this script. LGM_RAY_CHROMIUM=/path/to/chromium points the tests at another binary.
set -uo pipefail

for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "chromium: $(command -v "$name") ($("$name" --version 2>/dev/null | head -1))"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: not installed and no apt-get here; the browser tests will skip" >&2
  exit 0
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "chromium: not installed, and installing it needs root (apt-get install chromium); the browser tests will skip" >&2
    exit 0
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "chromium: installing Debian's chromium (apt-get install chromium)"
if "${SUDO[@]}" nice -n 19 apt-get update -q >/dev/null \
    && "${SUDO[@]}" nice -n 19 apt-get install -y -q chromium >/dev/null; then
  echo "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null | head -1))"
else
  echo "chromium: apt-get install chromium failed; the browser tests will skip" >&2
fi
exit 0
