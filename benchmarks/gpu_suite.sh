#!/usr/bin/env bash
# The issue-8 GPU measurements in one command, for a bare CUDA machine with torch
# and torchvision but without detkit's other dependencies.
#
#   bash benchmarks/gpu_suite.sh [PARTS]      PARTS: any of step layout profile loop loop_resnet loader compile quickstart
#                                              ddp fpn zoo scratch
#                                              (default: step layout loop loader)
#
# Needs the wheels of pydantic, pydantic_core, annotated-types, typing-inspection and
# entrypoints in .whl/ (see benchmarks/README.md, "GPU figures"); installs them and
# detkit (no dependencies) into /tmp/site.  Writes logs under $OUT (or /tmp/gpu_suite).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
PARTS=${*:-step layout loop loader}
has() { [[ " $PARTS " == *" $1 "* ]]; }

if ! python3 -c "import pydantic, entrypoints" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . >/dev/null || exit 1
rm -rf build detkit.egg-info  # setuptools' leftovers: an egg-info on sys.path would register every plugin twice
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, detkit; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cpus', __import__('os').cpu_count())"
uptime

STEP="python3 benchmarks/train_step.py --device cuda --batch 8 --size 600 --reps 10 --warmup 3 --no-split"
if has step; then
  echo "=== plain step, channels-last (default), fp32 and amp"
  $STEP --precision fp32 amp 2>&1 | tee "$OUT/step.log" | grep -v "^$"
  echo "=== early-stopping RPN NMS against the full NMS per image, interleaved"
  $STEP --precision amp fp32 --interleave --fpn-size 0 \
    --backbones vgg16 vgg16/full-nms resnet50 resnet50/full-nms 2>&1 | tee "$OUT/step_nms.log" | grep -A20 "^summary"
fi
if has layout; then
  echo "=== plain step, NCHW (--no-channels-last)"
  $STEP --precision fp32 amp --no-channels-last 2>&1 | tee "$OUT/step_nchw.log" | grep -A20 "^summary"
  echo "=== resnet50 with BatchNorm as its own pass (--no-fold-bn), and a profile of the fp32 step"
  $STEP --backbones resnet50 --precision fp32 amp --no-fold-bn 2>&1 | tee "$OUT/step_nofold.log" | grep -A20 "^summary"
  $STEP --backbones resnet50 --precision fp32 --profile 25 --reps 3 2>&1 | tee "$OUT/profile_resnet.log" | grep -v "^$" | head -45
fi
if has profile; then
  echo "=== profiles of one step: vgg16 amp, resnet50 amp"
  $STEP --backbones vgg16 resnet50 --precision amp --profile 22 --reps 3 2>&1 | tee "$OUT/profile_amp.log" \
    | grep -v "^$" | cut -c1-60,100-170
fi
if has loop; then
  echo "=== detkit train vs its bare step (vgg16, amp, 12 workers)"
  python3 benchmarks/train_loop.py --device cuda --backbone vgg16 --amp --batch 8 --size 600 --workers 12 \
    --images 480 --epochs 3 --steps 40 --root /tmp/photo_voc 2>&1 | tee "$OUT/loop_vgg16.log"
fi
if has loop_resnet; then
  echo "=== detkit train vs its bare step (resnet50, amp, 12 workers)"
  python3 benchmarks/train_loop.py --device cuda --backbone resnet50 --amp --batch 8 --size 600 --workers 12 \
    --epochs 2 --steps 30 --root /tmp/photo_voc 2>&1 | tee "$OUT/loop_resnet50.log"
fi
if has loader; then
  echo "=== loader scaling (16 CPUs)"
  python3 benchmarks/loader.py --workers 1 2 4 8 14 --batch 8 --size 600 --images 480 --root /tmp/photo_voc \
    --pin 2>&1 | tee "$OUT/loader.log"
fi
if has compile; then
  echo "=== torch.compile of the compile_modules: backbone (neck) and RoI box head (amp)"
  timeout 300 $STEP --precision amp --compile --warmup 4 2>&1 | tee "$OUT/step_compile.log" | grep -A20 "^summary"
fi
if has quickstart; then
  for w in ${QS_WORKERS:-0 4}; do
    echo "=== quickstart on the GPU, 1 epoch, num_workers $w"
    rm -rf /tmp/qs$w
    /usr/bin/time -f "%e s wall" detkit train configs/quickstart.yaml --out /tmp/qs$w --set train.device=cuda \
      --set train.epochs=1 --set data.num_workers=$w 2>&1 | tail -3
    python3 -c "import json,statistics;r=[json.loads(l) for l in open('/tmp/qs$w/metrics.jsonl')];t=[x['images_per_s'] for x in r if x.get('type')=='train'][1:];print('quickstart images/s (mean of windows after the first):', round(statistics.mean(t),1))"
  done
fi
if has scratch; then
  # The clutter set is written in the background while the other parts time the GPU
  # (one CPU process of 16); the scratch run waits for it.
  ( python3 -m detkit.cli data synth /tmp/clutter --preset clutter --image-format jpg > "$OUT/synth.log" 2>&1 ) &
  SYNTH=$!
fi
if has ddp; then
  # Each process draws its synthetic images in Python first (about 0.5 s per 600 px image): keep them few.
  echo "=== DDP overhead on one GPU (issue 7): ResNet50-C4, batch 2 at 480x640"
  timeout ${DDP_TIMEOUT:-120} python3 benchmarks/ddp.py --device cuda --config configs/frcnn_resnet50.yaml \
    --set model.backbone.pretrained=false \
    --set 'data.train={type: synthetic, num_images: 64, image_size: [480, 640], object_size: [32, 200]}' \
    --set data.batch_size=2 --steps 20 --warmup 4 --procs 1 2>&1 | tee "$OUT/ddp.log" | grep -v "^$"
fi
if has fpn; then
  echo "=== R50-FPN: detkit against torchvision's fasterrcnn_resnet50_fpn (issue 11)"
  timeout ${FPN_TIMEOUT:-120} python3 benchmarks/fpn_vs_torchvision.py --device cuda --size 800 --batch 4 --reps 10 \
    2>&1 | tee "$OUT/fpn.log"
fi
if has zoo; then
  echo "=== torchvision's Faster R-CNN zoo: detkit against torchvision, one image per call at each model's size"
  timeout ${ZOO_TIMEOUT:-240} python3 benchmarks/fpn_vs_torchvision.py --device cuda --models all --reps 10 \
    2>&1 | tee "$OUT/zoo.log"
fi
if has scratch; then
  wait $SYNTH; tail -2 "$OUT/synth.log"
  # The held-out set needs its twelve photographs, which this machine cannot download: write them
  # beforehand with `python benchmarks/photo_voc.py heldout /tmp/detkit_heldout` where pip reaches
  # the registry, copy /tmp/detkit_heldout_photos to .heldout_photos/ and carry it with .whl/.
  if [ -d "${HELDOUT_PHOTOS:-.heldout_photos}" ]; then
    python3 benchmarks/photo_voc.py heldout /tmp/heldout --photos "${HELDOUT_PHOTOS:-.heldout_photos}" | tail -1
    SCRATCH_ONLY=""
  else
    echo "no ${HELDOUT_PHOTOS:-.heldout_photos}/: the clutter preset only"; SCRATCH_ONLY="--only clutter"
  fi
  echo "=== ResNet50-GN from scratch on the clutter preset and the held-out photo set (issues 12, 21), amp"
  timeout ${SCRATCH_TIMEOUT:-500} python3 benchmarks/scratch_recipes.py resnet50_gn --data /tmp/clutter --heldout /tmp/heldout \
    $SCRATCH_ONLY --out /tmp/scratch_r50 --set data.num_workers=8 ${SCRATCH_SETS:-} 2>&1 | tee "$OUT/scratch_resnet50_gn.log"
  for s in clutter heldout; do cp /tmp/scratch_r50/$s/metrics.jsonl "$OUT/scratch_${s}_metrics.jsonl" 2>/dev/null; done
fi
uptime
