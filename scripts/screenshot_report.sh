#!/usr/bin/env bash
# Render a run's report.html in headless Chromium (Debian's package) and save a PNG screenshot beside it.
#   scripts/screenshot_report.sh runs/demo            -> runs/demo/report.png
# Installs chromium with apt-get if it is missing. No network access is needed by the page itself: the report is
# self-contained (figures embedded), and Chromium's background networking is switched off.
set -euo pipefail
run="${1:?usage: screenshot_report.sh RUN_DIR}"
report="$(cd "$run" && pwd)/report.html"
[ -f "$report" ] || { echo "no report.html in $run (run: vismech report $run)" >&2; exit 2; }
command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null
profile="$(mktemp -d)"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1200,"${HEIGHT:-4000}" --screenshot="$(dirname "$report")/report.png" "file://$report" 2>/dev/null
rm -rf "$profile"
echo "$(dirname "$report")/report.png"
