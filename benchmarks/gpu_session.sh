#!/usr/bin/env bash
# One short GPU session, in priority order (each step writes to $OUT, so a cut-off run still reports):
#   1. NMI-HAD step throughput, bf16, ours vs baseline, with model-FLOP utilisation
#   2. `unip pretrain` end to end on CUDA with bf16 autocast and with fp16 + grad scaler
#   3. backbone accelerator check (bf16 logits error, flash SDPA, cut-at-layer speed-up)
# Usage (repo root, a python3 with torch+timm+safetensors+pyyaml+tqdm): OUT=/tmp/out bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 90 python3 benchmarks/pretrain_throughput.py --device cuda --dtype bf16 --steps 5 \
    --json "$OUT/pretrain_bf16.json" 2>&1 | tee "$OUT/pretrain_bf16.txt"
python3 - "$OUT/work" <<'PY'
import sys
from pathlib import Path
from unip.demo import make_toy_teacher
from unip.data.synth import write_unlabeled
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
make_toy_teacher(root / "teacher.safetensors")
write_unlabeled(str(root / "images"), 64, name="synth", size=(160, 128))
PY
for precision in bf16 fp16; do
  timeout 60 python3 -m unip.cli pretrain toy --teacher "$OUT/work/teacher.safetensors" --teacher-layer 6 \
      --data "$OUT/work/images" --out "$OUT/work/run_$precision" --device cuda --precision "$precision" \
      --epochs 2 --workers 2 2>&1 | tail -3 | tee "$OUT/pretrain_cli_$precision.txt"
  python3 -m unip.cli info "$OUT/work/run_$precision/student.safetensors" | tee -a "$OUT/pretrain_cli_$precision.txt"
done
rm -rf "$OUT/work"
timeout 60 python3 benchmarks/backbone_cuda_check.py --batch-size 64 --steps 10 --no-compile 2>&1 | tee "$OUT/backbone.json"
