#!/usr/bin/env bash
# The GPU checks README reports, on a lent GPU machine, from the repository root:
#   bash tests/gpu_check.sh [smoke] [timm] [bench] [xi]      (default: all four)
# smoke: every script on CUDA (bf16 autocast, fp16 + GradScaler, --compile); timm: ResNetV2 against
# timm's resnetv2_50; bench: tests/bench.py; xi: tests/vat_xi.py on a ResNet-50v2. Logs go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}; parts=${*:-smoke timm bench xi}
nvidia-smi -L; $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
T="--data synthetic --arch resnet18 --width 0.25 --img-size 32 --batch-size 32 --workers 2 --epochs 2 --labels 10"
S=/tmp/smoke
smoke() { name=$1; shift; timeout 120 $PY "$@" > "$S.$name.log" 2>&1; rc=$?
          echo "smoke $name: exit $rc $(grep '^{' "$S.$name.log" | tail -n 1 | cut -c1-160)"; cat "$S.$name.log" >> "$OUT/smoke.log"; }
if [[ $parts == *smoke* ]]; then
  smoke baseline baseline.py $T --out $S/baseline &
  smoke rotation rotation.py $T --eval-rotations --out $S/rotation &
  smoke rotation0 rotation.py $T --labels 0 --out $S/rotation0 &
  smoke vat vat.py $T --entmin-weight 1 --out $S/vat &
  smoke exemplar exemplar.py $T --out $S/exemplar &
  smoke moam moam.py $T --step all --out $S/moam &
  smoke fp16 baseline.py $T --amp fp16 --out $S/fp16 &
  smoke compile-baseline baseline.py $T --compile --out $S/cbaseline &
  smoke compile-vat vat.py $T --compile --out $S/cvat &
  wait
  smoke linear linear_eval.py $T --ckpt $S/rotation0/final.pt --out $S/linear &
  smoke pseudolabel pseudolabel.py $T --teacher $S/baseline/final.pt --tta --out $S/pseudolabel &
  wait
fi
[[ $parts == *timm* ]] && timeout 120 $PY -m pytest -q tests/test_timm.py 2>&1 | tail -n 2
[[ $parts == *bench* ]] && timeout 300 $PY tests/bench.py --part ${BENCH_PART:-all} --device cuda ${BENCH_FLAGS:---compile} \
  --json "$OUT/bench.json" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
[[ $parts == *xi* ]] && timeout 240 $PY tests/vat_xi.py --arch 50 --device cuda --steps 10 2>&1 | tee "$OUT/vat_xi.log"
exit 0
