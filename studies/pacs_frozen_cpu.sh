#!/usr/bin/env bash
# The CPU PACS study in one command (README, "What to expect on PACS with pretrained weights"):
#   bash studies/pacs_frozen_cpu.sh            # PACS from the public download
#   PACS_ZIP=/path/to/PACS.zip bash studies/pacs_frozen_cpu.sh
# Every stage reads studies/pacs_frozen_cpu.yaml: download, preprocess (146 px), the frozen
# EfficientNet-Lite0 trunk's features (4 views, 128 px), the 36 runs (4 targets x Aggregate,
# Multi-Headed, DMG x 3 seeds; dmg study skips finished runs, so a re-run continues), the
# lambda_O sweep on sketch, and the report. Each stage's wall time and CPU seconds go to
# benchmarks/results/pacs_frozen_cpu/timings.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
P=studies/pacs_frozen_cpu.yaml
OUT=${OUT:-benchmarks/results/pacs_frozen_cpu}
mkdir -p "$OUT"
echo "stage,wall_seconds,cpu_seconds" > "$OUT/timings.csv"

stage() {  # stage NAME COMMAND...: run it; append its wall time and user+system CPU seconds
  local name=$1; shift
  echo "== $name: $*" >&2
  /usr/bin/time -f "$name,%e,%U,%S" -a -o "$OUT/.times" "$@"
  tail -1 "$OUT/.times" | awk -F, '{printf "%s,%s,%.1f\n", $1, $2, $3 + $4}' >> "$OUT/timings.csv"
}

rm -f "$OUT/.times"
stage check dmg check --params "$P"
stage download dmg download pacs ${PACS_ZIP:+--from "$PACS_ZIP"} --params "$P"
stage preprocess dmg preprocess pacs --params "$P"
stage features dmg features --params "$P"
stage study dmg study --params "$P" --device cpu
stage sweep dmg sweep --params "$P" --device cpu
stage report dmg report --params "$P" --format markdown --out "$OUT/report.md"
stage report_dir dmg report --params "$P"
cat "$OUT/timings.csv"
