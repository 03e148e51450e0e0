#!/usr/bin/env bash
# What the review page's browser test (tests/test_review_browser.py) needs, for `make browser`:
# Debian's headless Chromium and its driver (apt-get, root only; nothing is downloaded at test time),
# and selenium in the venv (it is in the dev extra; installed here alone if missing).
# Idempotent, and quick when everything is present. Without root it says what to run and exits 0:
# the browser test then skips with the same sentence.
set -euo pipefail

BIN="${1:-.venv/bin}"

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    :
elif [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
    echo "browser-deps: chromium or chromedriver missing and not root; the review page's browser test will be" \
         "skipped (as root: apt-get install chromium chromium-driver)" >&2
fi

if ! "$BIN/python" -c "import selenium" 2>/dev/null; then
    "$BIN/pip" install -q "selenium>=4.20"
fi
