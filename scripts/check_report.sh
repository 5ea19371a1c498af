#!/usr/bin/env bash
# Screenshot the demo's report in headless Chromium (Debian: apt-get install -y chromium), to look at it.
#
#   scripts/check_report.sh [DIR [OUT.png [WIDTHxHEIGHT]]]
#
# DIR defaults to demo-report (from `diffdistill demo`), OUT.png to DIR/screenshot.png, the window to 1200x2000.
# Also fails when index.html references a file that does not exist.
set -euo pipefail

dir=${1:-demo-report}
shot=${2:-$dir/screenshot.png}
size=${3:-1200x2000}
page="$dir/index.html"

if [[ ! -f "$page" ]]; then
    echo "check_report: $page not found (run: diffdistill demo --out $dir)" >&2
    exit 1
fi
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "check_report: no chromium found (Debian/Ubuntu: apt-get install -y chromium)" >&2
    exit 1
fi

# Every image the page references must exist (paths are relative to DIR).
missing=0
while IFS= read -r src; do
    if [[ ! -f "$dir/$src" ]]; then
        echo "check_report: $page references $src, which does not exist" >&2
        missing=1
    fi
done < <(grep -o "src='[^']*'" "$page" | sed "s/^src='//; s/'$//")
if grep -qE "(src|href)=['\"](https?:)?//" "$page"; then
    echo "check_report: $page loads something remote; it must be self-contained" >&2
    missing=1
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs_page=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
mkdir -p "$(dirname "$shot")"
abs_shot=$(cd "$(dirname "$shot")" && pwd)/$(basename "$shot")
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$abs_shot" "file://$abs_page" \
    >/dev/null 2>&1 || { echo "check_report: chromium failed" >&2; exit 1; }
if [[ ! -s "$abs_shot" ]]; then
    echo "check_report: no screenshot written" >&2
    exit 1
fi
echo "$abs_shot"
exit $missing
