#!/usr/bin/env bash
# Issue 8 on a GPU, in one device call: the decode question (part 3) and DMG vs Aggregate on
# real PACS (part 4). Writes everything under $OUT (default benchmarks/results/gpu_fidelity).
#
# Prepare here (CPU machine), from the repository root: bash benchmarks/gpu_prepare.sh
# (fills the git-ignored .device_carry/ with PACS at 128 px and the split lists). Then one call:
#   run(command="bash benchmarks/gpu_fidelity.sh", carry=[".device_carry"], timeout_s=600)
# Each step has its own time limit, so a slow step costs only its own share; results are written
# as they come. Budget: about 9 minutes of a 15-minute lease (start-up takes 1-2). Run it before
# benchmarks/gpu_session.sh (speed, issue 9): fidelity comes first, and both do not fit one lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_fidelity}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # dmg from the tree, nothing installed
DMG="python3 -m dmgcli.cli"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }

python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

log "decode question (part 3)"
timeout 120 python3 benchmarks/gpu_decode_check.py --out "$OUT/gpu_decode_check.json" >"$OUT/decode.log" 2>&1
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu_decode.py tests/test_engine.py >"$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT/gpu_tests.log" | tee -a "$OUT/steps.log"

log "PACS at 128 px"
WORK=$(mktemp -d)
cp params.yaml "$WORK/"
(cd "$WORK" && timeout 240 $DMG download pacs --from "$OLDPWD/.device_carry/pacs_small.zip" \
   --splits "$OLDPWD/.device_carry/pacs_splits" && timeout 240 $DMG preprocess pacs --image-size 128) \
  >"$OUT/prepare.log" 2>&1 || { log "PACS preparation failed"; tail -5 "$OUT/prepare.log"; exit 1; }

# ResNet-18 from scratch (no ImageNet weights on that machine), 224 crops of the 128 px images,
# every target, Aggregate and DMG at the same 30 epochs, then DMG at 45 (the reference's 3:2 ratio
# of DMG to baseline epochs). Source validation picks the epoch; the script reports every
# selection rule and evaluation mode per run (benchmarks/fidelity_experiment.py).
log "DMG vs Aggregate, 30 epochs"
timeout 330 python3 benchmarks/fidelity_experiment.py --params "$WORK/params.yaml" --data-dir "$WORK/data" \
  --dataset pacs --backbone resnet18 --device cuda --workers 8 --seeds 0 --epochs 30 \
  --variants aggregate dmg --out "$OUT/fidelity_pacs_resnet18_30ep.json" >"$OUT/fidelity_30ep.log" 2>&1
tail -30 "$OUT/fidelity_30ep.log"
log "DMG 45 epochs"
timeout 150 python3 benchmarks/fidelity_experiment.py --params "$WORK/params.yaml" --data-dir "$WORK/data" \
  --dataset pacs --backbone resnet18 --device cuda --workers 8 --seeds 0 --epochs 45 \
  --variants dmg --out "$OUT/fidelity_pacs_resnet18_45ep.json" >"$OUT/fidelity_45ep.log" 2>&1
tail -15 "$OUT/fidelity_45ep.log"
log "done"
