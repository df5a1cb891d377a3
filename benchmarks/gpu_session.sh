#!/usr/bin/env bash
# The GPU measurements of docs/pretrain.md and docs/segmentation.md, in short parts (each under 10 minutes on
# an H100, each writing everything to $OUT, each runnable on a bare machine):
#   step: environment, generated packed data set (20,480 thermal scenes), FP8 teacher accuracy
#         (benchmarks/fp8_teacher.py), NMI-HAD step throughput against the release's step
#         (benchmarks/pretrain_throughput.py: release, ours, ours+compile, ours+compile+fp8)
#   e2e:  CUDA tests (FP8, analysis, the tanh-GELU epilogue, the sync-free step), then `unip pretrain` end to
#         end on the generated pack (made first if missing; batch 256, 14 workers, bf16 and FP8 teacher), images/s
#         read from its own log.jsonl
#   next: what a 15-minute device session should run first (about 8 min; all in $OUT/results.tgz): `unip
#         pretrain` end to end with the defaults, a log record per step, dynamo's recompile log and every thread's
#         stack each 10 s (its start-up took 50-86 s on 2026-11-27 against 4.5 s the day before: where does it
#         go?), then end to end with CUDA
#         graphs (run.compile_mode=reduce-overhead: 1.67x the release's step, not yet run end to end)
#   extra: (about 5 min, on the same warm machine) end to end with CUDA graphs and --teacher-gelu tanh, and the
#         step of ours+compile with CUDA graphs profiled
#   trial NAME SECONDS ARGS...: one run of benchmarks/pretrain_throughput.py (batch 256) with ARGS, into
#         results.tgz, e.g. `trial step 100 --rows release,ours+compile --profile ours+compile`
#   seg:  UNIP-S segmentation at 512 px (benchmarks/seg_throughput.py): fine-tuning step images/s and bf16/fp16
#         MFU (eager and compiled), batched sliding windows against one at a time
# Usage (repo root, a python3 with torch, timm, safetensors, pyyaml, tqdm, tensorboard; torchao wheels in
# .whl/ are installed to /tmp/site): OUT=/tmp/out bash benchmarks/gpu_session.sh step|e2e|next|extra|trial|seg
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
W=${WORK:-/tmp/unip_gpu}
mkdir -p "$OUT" "$W"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

R=$W/results  # next and trial keep everything here and in $OUT/results.tgz (a device session returns 8 files)
mkdir -p "$R"
save() { tar czf "$OUT/results.tgz" -C "$R" . ; }

make_data() {  # 20,480 generated 320x256 thermal scenes, packed at short side 256 (skipped when present)
  [ -f "$W/pack/index.json" ] && return
  for i in $(seq 0 15); do
    python3 -m unip.cli data synth --out "$W/ir" --num 1280 --name "s$i" --size 320x256 --seed "$i" >/dev/null 2>&1 &
  done
  wait
  python3 -m unip.cli data infmix --infrared "$W/ir" --out "$W/infmix.jsonl" --workers 16
  python3 -m unip.cli data pack "$W/infmix.jsonl" --out "$W/pack" --short-side 256 --workers 16
}

env_info() {  # env_info FILE: torch, GPU, torchao, whether FP8 runs, CPU count
  python3 - <<'PY' 2>&1 | grep -v -i warning | tee "$1"
import torch
from unip.models.quantize import fp8_unavailable_reason
print("torch", torch.__version__, "|", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
try:
    import torchao; print("torchao", torchao.__version__)
except ImportError as err:
    print("torchao missing:", err)
print("fp8:", fp8_unavailable_reason(torch.device("cuda")) or "available")
PY
  nproc >> "$1"
}

step() {
  env_info "$OUT/env.txt"
  make_data > "$OUT/data.txt" 2>&1 &
  data=$!
  timeout 150 python3 benchmarks/fp8_teacher.py --json "$OUT/fp8.json" 2>&1 | grep -v Warning | tee "$OUT/fp8.txt"
  wait $data
  tail -3 "$OUT/data.txt"
  timeout 330 python3 benchmarks/pretrain_throughput.py --batch-size 256 --json "$OUT/step.json" 2>&1 \
    | grep -v Warning | tee "$OUT/step.txt"
}

prepare() {  # prepare DIR: the pack (made in the background), the CUDA tests meanwhile (once), a random ViT-L teacher
  make_data > "$1/data.txt" 2>&1 &
  local data=$!
  [ -f "$1/cuda_tests.txt" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py \
    tests/test_analysis.py tests/test_distill_teacher.py tests/test_engine.py tests/test_pretrain.py \
    -k "fp8 or cuda" \
    2>&1 | tail -3 | tee "$1/cuda_tests.txt"
  [ -f "$W/vitl.safetensors" ] || python3 -c "
from unip.checkpoint import save_checkpoint; from unip.models import create_model
save_checkpoint(create_model('vit_large_patch16'), '$W/vitl.safetensors', {'note': 'random ViT-L'})"
  wait $data
  tail -2 "$1/data.txt"
}

e2e() {  # e2e [teachers...]: default bf16 and fp8
  prepare "$OUT"
  local teachers=("$@")
  [ $# -eq 0 ] && teachers=(bf16 fp8)
  for teacher in "${teachers[@]}"; do
    e2e_run "$teacher" 170
  done
}

# python3 -m unip.cli; with STACKS=N set, every thread's Python stack also goes to stderr every N seconds
STACK_DUMPS="import faulthandler, runpy, sys; faulthandler.dump_traceback_later(int(sys.argv.pop(1)), repeat=True)
runpy.run_module('unip.cli', run_name='__main__', alter_sys=True)"

e2e_run() {  # e2e_run TEACHER_PRECISION SECONDS [GELU [COMPILE_MODE [LOG_EVERY]]]: `unip pretrain` on the pack,
  # images/s from its log.jsonl; its output (dynamo's recompiles with TORCH_LOGS=recompiles) in e2e_NAME.log
  local teacher=$1 gelu=${3:-exact} mode=${4:-default} every=${5:-10}
  [ "$gelu" = exact ] || teacher=${teacher}_$gelu
  [ "$mode" = default ] || teacher=${teacher}_$mode
  rm -rf "$W/run_$teacher"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 1000 > "$OUT/smi_$teacher.csv" &
  local smi=$!
  local launcher
  if [ -n "${STACKS:-}" ]; then launcher=(python3 -c "$STACK_DUMPS" "$STACKS"); else launcher=(python3 -m unip.cli); fi
  timeout "$2" "${launcher[@]}" pretrain mae-l_unip-s --teacher "$W/vitl.safetensors" --data "$W/pack" \
    --out "$W/run_$teacher" --epochs 2 --batch-size 256 --accum-iter 1 --set optim.effective_batch=null \
    --workers 14 --teacher-precision "$1" --teacher-gelu "$gelu" --set run.log_every="$every" \
    --set run.compile_mode="$mode" --set run.progress=false --set run.save_every_steps=0 2>&1 \
    | while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done > "$OUT/e2e_$teacher.log"
  grep -v Warning "$OUT/e2e_$teacher.log" | tail -4
  kill $smi
  cp "$W/run_$teacher/log.jsonl" "$OUT/e2e_$teacher.jsonl"
  python3 - "$OUT/e2e_$teacher.jsonl" <<'PY' | tee -a "$OUT/e2e.txt"
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in records if "images_per_s" in r]
skip = max(2, len(rows) // 8)  # the first windows include compilation
rates = [r["images_per_s"] for r in rows[skip:]]
print(sys.argv[1], "windows", len(rows), "median images/s after warm-up",
      round(statistics.median(rates), 1) if rates else None, "last loss", rows[-1]["loss"] if rows else None)
print("  seconds after setup at steps", [(r["step"], round(r["time"] - records[0]["time"], 1)) for r in rows[:12]])
PY
}

next() {
  env_info "$R/env.txt"
  prepare "$R"; save
  STACKS=10 TORCH_LOGS=recompiles OUT=$R e2e_run bf16 200 exact default 1; save
  OUT=$R e2e_run bf16 170 exact reduce-overhead; save
}

extra() {  # after next, on the same warm machine: CUDA graphs and the tanh GELU end to end, the graphed step profiled
  env_info "$R/env.txt"
  prepare "$R"; save
  OUT=$R e2e_run bf16 170 tanh reduce-overhead; save
  trial step_cudagraphs 170 --rows release,ours+compile --compile-mode reduce-overhead --profile ours+compile
}

trial() {  # trial NAME SECONDS ARGS...: the step benchmark (batch 256) in its own process, into $R/NAME.{txt,json}
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" python3 benchmarks/pretrain_throughput.py --batch-size 256 --json "$R/$name.json" \
    --profile-out "$R" "$@" 2>&1 \
    | grep -v Warning | tail -30 | tee "$R/$name.txt"
  save
}

seg() {
  timeout 560 python3 benchmarks/seg_throughput.py --device cuda --compile --json "$OUT/seg.json" 2>&1 \
    | grep -v Warning | tee "$OUT/seg.txt"
}

"${@:-step}"
