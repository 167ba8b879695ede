#!/usr/bin/env bash
# The GPU checks README reports, in one call of a lent GPU machine (from the repository root):
# every script on CUDA (bf16 autocast, fp16 + GradScaler, --compile), ResNetV2 against timm, the
# throughput bench, and VAT's xi by precision. Logs and JSON go to $OUT (default /tmp/gpu_check).
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L; $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
T="--data synthetic --arch resnet18 --width 0.25 --img-size 32 --batch-size 32 --workers 2 --epochs 2 --labels 10"
smoke() { name=$1; shift; timeout 300 $PY "$@" > "$OUT/smoke_$name.log" 2>&1; echo "smoke $name: exit $? $(grep '^{' "$OUT/smoke_$name.log" | tail -n 1 | cut -c1-150)"; }
S=/tmp/smoke
smoke baseline baseline.py $T --out $S/baseline &
smoke rotation rotation.py $T --eval-rotations --out $S/rotation &
smoke rotation0 rotation.py $T --labels 0 --out $S/rotation0 &
smoke vat vat.py $T --entmin-weight 1 --out $S/vat &
smoke exemplar exemplar.py $T --out $S/exemplar &
smoke moam moam.py $T --step all --out $S/moam &
smoke fp16 baseline.py $T --amp fp16 --out $S/fp16 &
smoke compile-baseline baseline.py $T --compile --out $S/cbaseline &
smoke compile-vat vat.py $T --compile --out $S/cvat &
smoke compile-moam moam.py $T --compile --step 1 --out $S/cmoam/step1 &
wait
smoke linear linear_eval.py $T --ckpt $S/rotation0/final.pt --out $S/linear &
smoke pseudolabel pseudolabel.py $T --teacher $S/baseline/final.pt --tta --out $S/pseudolabel &
wait
timeout 120 $PY -m pytest -q tests/test_timm.py 2>&1 | tail -n 2
timeout 300 $PY tests/bench.py --part all --device cuda --compile --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v Warning
timeout 240 $PY tests/vat_xi.py --arch 50 --device cuda --steps 10 2>&1 | tee "$OUT/vat_xi.log"
