#!/usr/bin/env bash
# The whole GPU check of issue 9 in ONE device call (about 9 minutes; the call's limit is 10).
#
# Here first:   bash benchmarks/gpu_prepare.sh      (fills the git-ignored .device_carry/)
# Then the device tool's run with:
#   command:    bash benchmarks/gpu_session.sh
#   carry:      [".device_carry"]
#   timeout_s:  600
# Every step has its own time limit and the script stops starting steps before its budget
# (BUDGET seconds) runs out; each step's output is appended to log.txt and its JSON files
# land in benchmarks/results/gpu/, all packed into $OUT/results.tgz after every step, so a
# cut-off call still brings back what finished. Unpack here with
#   tar xzf /work/.device/.../results.tgz -C benchmarks/results/   (files_at of the reply)
# then copy the figures into benchmarks/RESULTS.md beside their targets.
#
# Nothing is installed: the machine's python3 has torch, torchvision, h5py, typer, yaml,
# tqdm, pytest; dmg runs from the tree (PYTHONPATH), dvc is not needed.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-560}
OUT=${OUT:-/tmp/dmg-gpu-out}
mkdir -p "$OUT"
RES=benchmarks/results/gpu
mkdir -p "$RES"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
DMG="python3 -m dmgcli.cli"  # a command, not a function: `timeout` runs it

pack() { cp "$LOG" "$RES/log.txt" 2>/dev/null; tar czf "$OUT/results.tgz" -C benchmarks/results gpu 2>/dev/null; }

# step NAME LIMIT_SECONDS COMMAND...: runs it with `timeout`, shortened to what the budget has left.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  if [ "$left" -lt 25 ]; then echo "== $name: SKIPPED (budget spent)" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)" | tee -a "$LOG"
  local s=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - s ))s" | tee -a "$LOG"
  pack
}

B="--batch-size 64 --steps 50 --warmup 10 --eval-steps 10 --out $RES"

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  lscpu | grep -E 'Model name|^CPU\(s\)'
  git log -1 --format='commit %H %s' 2>/dev/null || true
}

pacs_data() {  # real PACS (128 px copy, stored at 256 px as dmg preprocess stores it) for the study
  python3 - <<'EOF'
import yaml
p = yaml.safe_load(open("params.yaml"))
p.update(dataset="pacs", data_dir="/tmp/dmg-data")
p["matrix"].update(targets=["art_painting", "cartoon", "photo", "sketch"], methods=["dmg"], backbones=["resnet18"])
yaml.safe_dump(p, open("/tmp/pacs-params.yaml", "w"))
EOF
  $DMG download pacs --params /tmp/pacs-params.yaml --from .device_carry/pacs_small.zip --splits .device_carry/pacs_splits &&
    $DMG preprocess pacs --params /tmp/pacs-params.yaml
}
export -f env_info pacs_data
export DMG

echo "dmg GPU session $(date -u +%FT%TZ)" | tee "$LOG"
step env 20 bash -c env_info
# 1. The ceiling: the plain step of torchvision's models, same call, same GPU.
step ceiling 90 python3 .device_carry/ceiling_quick.py "$RES/ceiling_quick.json"
# 2. dmg bench: streamed and resident end to end, method step, plain step, evaluation.
#    ResNet-18 DMG also gives the concurrent-runs figure (1, 2, 4 processes).
step bench-resnet18-dmg 130 $DMG bench --device cuda --backbone resnet18 --method dmg $B --concurrent 1 --concurrent 2 --concurrent 4
step bench-resnet18-aggregate 45 $DMG bench --device cuda --backbone resnet18 --method aggregate $B
step bench-alexnet-dmg 45 $DMG bench --device cuda --backbone alexnet --method dmg $B
step bench-resnet50-dmg 60 $DMG bench --device cuda --backbone resnet50 --method dmg $B
step bench-resnet50-aggregate 55 $DMG bench --device cuda --backbone resnet50 --method aggregate $B
# 3. Per-kernel profile of the steps (what DMG adds over Aggregate, Aggregate over plain).
step profile-resnet18 40 python3 benchmarks/gpu_profile.py --backbone resnet18 --out "$RES/profile-resnet18.json"
# 4. The CUDA tests (GPU decode = CPU decode, bf16 / channels_last / fused step).
step pytest-gpu 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py
# 5. The PACS study: real images, 4 targets x DMG, 4 runs at once, 3 epochs; projection of the whole study.
step pacs-data 60 bash -c pacs_data
step pacs-study 100 python3 benchmarks/pacs_study_projection.py --params /tmp/pacs-params.yaml --jobs 4 --epochs 3 --out "$RES/pacs_study_projection.json"
# 6. Compiled step (CUDA graphs): cold start and steady rate, the launch-bound small network.
step bench-alexnet-dmg-graphs 100 $DMG bench --device cuda --backbone alexnet --method dmg $B --compile --compile-mode reduce-overhead
step bench-alexnet-aggregate 40 $DMG bench --device cuda --backbone alexnet --method aggregate $B
# 7. If time is left: our input path (resident) against ImageFolder + PIL on the same real images.
step compare-resnet18 90 python3 benchmarks/compare_input_paths.py --device cuda --backbone resnet18 --pacs .device_carry/pacs_small.zip --images 4096 --out "$RES"
echo "done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
pack
# The figures, last, so the reply's output tail carries them.
python3 - <<'EOF'
import glob, json
for f in sorted(glob.glob("benchmarks/results/gpu/bench-*.json")):
    r = json.load(open(f)); s = r["settings"]
    line = (f"{s['backbone']:9s} {s['method']:9s} compile={s['compile'] and s['compile_mode']}: e2e {r['end_to_end_img_s']:7.0f} "
            f"resident {r['resident_img_s']:7.0f} method {r['method_step_img_s']:7.0f} plain {r['plain_step_img_s']:7.0f} "
            f"res/plain {r['resident_vs_plain']:.2f} eval {r['eval_img_s']:6.0f}")
    if "concurrent" in r:
        line += " | concurrent " + ", ".join(f"{k}: {v['img_s']:.0f}" for k, v in r["concurrent"].items())
    print(line)
for f in glob.glob("benchmarks/results/gpu/pacs_study_projection.json"):
    print(json.load(open(f)))
EOF
