#!/usr/bin/env bash
# Debian's Chromium for the chat-page browser test (tests/serving/test_chat_page.py).
#
# Playwright drives the system browser (/usr/bin/chromium): these machines reach package
# registries only, so Playwright's own browser download cannot work. Idempotent; needs root
# (CI and the project's machines run as root) or an already installed chromium.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo unknown)"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install_chromium.sh: Debian's chromium is needed for the browser test; run 'sudo apt-get install chromium'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "installed $(chromium --version)"
