#!/bin/sh
# Make sure a headless-capable Chromium exists for the web chat test (tests/test_serve_web.py).
# Debian/Ubuntu: installs the `chromium` package with apt when it is missing (needs root or sudo).
# Anywhere else, or without apt, it only reports; the test then skips and says why.
set -eu
for exe in /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -x "$exe" ]; then
        echo "chromium: $exe"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found and apt-get is unavailable: install Chromium yourself; the web test will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "chromium not found and not root (no passwordless sudo): the web test will skip" >&2
        exit 0
    fi
fi
echo "installing chromium with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; then
    echo "chromium: $(command -v chromium)"
else
    echo "apt-get could not install chromium: the web test will skip" >&2
fi
exit 0
