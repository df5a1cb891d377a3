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
#   predict_fps: (issue 26, at most 15 min of timeouts) `unip predict` end to end on 64 generated 640x512 frames,
#         eager against --compile default and reduce-overhead, bf16, batch 16, two passes each
#   infer: (issue 26, at most 13 min of timeouts on an H100, run it alone; all in $OUT/results.tgz) UNIP-S at 512x640 (a 640x512 camera frame):
#         `unip bench` bf16 frames/s eager and torch.compile, whole frame and sliding windows, batch 1 (with and
#         without CUDA graphs) and batch 16; fine-tuning step images/s and bf16 MFU at the SODA recipe's shape (512
#         crops, batch 8) with batched against one-at-a-time sliding windows (benchmarks/seg_throughput.py); and the
#         pre-training start-up: seconds from the command to its first logged steps (small generated pack, random
#         ViT-L teacher). Dry run on a CPU with tiny settings: DEVICE=cpu TINY=1 OUT=/tmp/o bash ... infer
# Usage (repo root, a python3 with torch, timm, safetensors, pyyaml, tqdm, tensorboard; torchao wheels in
# .whl/ are installed to /tmp/site): OUT=/tmp/out bash benchmarks/gpu_session.sh step|e2e|next|extra|trial|seg|infer|predict_fps
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

infer() {  # issue 26's GPU numbers (header); DEVICE=cpu TINY=1 runs every command at toy size on a CPU
  local device=${DEVICE:-cuda} py=${PYTHON:-python3}
  local backbone=unip_vit_small_patch16 size="512 640" batch=16 iters=50 warm=10 crop=512 steps=10 seg_batch=8
  local precision=bf16 graphs=--cuda-graphs pretrain_seconds=100 teacher=vit_large_patch16 synth=320x256 num=1280
  local layer=auto compile=
  if [ -n "${TINY:-}" ]; then
    backbone=unip_vit_tiny_patch16 size="64 96" batch=2 iters=2 warm=0 crop=64 steps=1 seg_batch=2 graphs=
    precision=fp32 pretrain_seconds=240 teacher=vit_tiny_patch16 synth=96x64 num=16 layer=9
    compile=--no-compile  # inductor on a 2-core CPU takes minutes; tests/test_bench.py covers the compiled rows
  fi
  env_info_any "$R/env.txt" "$py"
  "$py" -c "
from unip.seg import build_segmentor, save_segmentor
save_segmentor(build_segmentor(21, '$backbone', img_size=$crop), '$W/seg.safetensors')" || return 1
  # frames/s at batch 1 (whole frame and sliding windows) and batched (whole frame), eager and compiled
  timeout 240 "$py" -m unip.cli bench --checkpoint "$W/seg.safetensors" --device "$device" --precision "$precision" \
    --size $size --batch 1 --no-onnx $compile --iters "$iters" --warmup "$warm" --out "$R/bench_b1.json" 2>&1 \
    | grep -v Warning | tee "$R/bench_b1.txt"
  save
  timeout 150 "$py" -m unip.cli bench --checkpoint "$W/seg.safetensors" --device "$device" --precision "$precision" \
    --size $size --batch "$batch" --modes whole --no-onnx $compile --iters "$iters" --warmup "$warm" \
    --out "$R/bench_b$batch.json" 2>&1 | grep -v Warning | tee "$R/bench_b$batch.txt"
  save
  if [ -n "$graphs" ]; then
    timeout 120 "$py" -m unip.cli bench --checkpoint "$W/seg.safetensors" --device "$device" --precision bf16 \
      --size $size --batch 1 --no-onnx --modes whole --iters "$iters" --warmup "$warm" $graphs \
      --out "$R/bench_graphs.json" 2>&1 | grep -v Warning | tee "$R/bench_graphs.txt"
    save
  fi
  timeout 150 "$py" benchmarks/seg_throughput.py --device "$device" --backbone "$backbone" --size "$crop" \
    --batch-size "$seg_batch" --steps "$steps" --precisions "$precision" --image "${size// /x}" --eval-batch 4 \
    --json "$R/seg_infer.json" 2>&1 | grep -v Warning | tee "$R/seg_infer.txt"
  save
  startup "$py" "$device" "$teacher" "$synth" "$num" "$pretrain_seconds" "$layer"
  save
}

predict_fps() {  # unip predict end to end (read, batch, forward, write) on 64 generated 640x512 frames: eager
  # against --compile default and reduce-overhead (CUDA graphs), bf16, batch 16; frames/s from each run's wall
  # time, printed with the first compile included and without it (a second pass over the same frames).
  # DEVICE=cpu TINY=1: 4 small frames, fp32, eager only (the dry run).
  local device=${DEVICE:-cuda} py=${PYTHON:-python3} backbone=unip_vit_small_patch16 num=64 size=640x512
  local precision=bf16 modes="none default reduce-overhead"
  if [ -n "${TINY:-}" ]; then backbone=unip_vit_tiny_patch16 num=4 size=96x64 precision=fp32 modes=none; fi
  env_info_any "$R/env.txt" "$py"
  [ -f "$W/seg.safetensors" ] || "$py" -c "
from unip.seg import build_segmentor, save_segmentor
save_segmentor(build_segmentor(21, '$backbone', img_size=512), '$W/seg.safetensors')" || return 1
  "$py" -m unip.cli data synth --out "$W/frames" --num "$num" --size "$size" --seed 2 >/dev/null 2>&1
  for mode in $modes; do
    local option=() start end
    [ "$mode" = none ] || option=(--compile "$mode")
    for pass in 1 2; do
      rm -rf "$W/pred_$mode"
      start=$(date +%s.%N)
      timeout 150 "$py" -m unip.cli predict --checkpoint "$W/seg.safetensors" "$W/frames" --out "$W/pred_$mode" \
        --device "$device" --precision "$precision" --batch-size 16 --format label --no-progress "${option[@]}" \
        >> "$R/predict_fps.log" 2>&1
      end=$(date +%s.%N)
      echo "predict --compile $mode pass $pass: $num frames in $("$py" -c "print(round($end - $start, 2))") s" | tee -a "$R/predict_fps.txt"
    done
    save
  done
}

env_info_any() {  # env_info_any FILE PYTHON: versions and the device (also without CUDA, for the dry run)
  "$2" -c "
import platform, torch
print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA',
      '|', platform.processor() or platform.machine())" 2>&1 | tee "$1"
  nproc >> "$1"
}

startup() {  # startup PYTHON DEVICE TEACHER SIZE NUM SECONDS LAYER: seconds from the command to the first logged steps
  local py=$1 device=$2 start first
  "$py" -m unip.cli data synth --out "$W/startup_ir" --num "$5" --size "$4" --seed 1 >/dev/null 2>&1
  [ -f "$W/startup_teacher.safetensors" ] || "$py" -c "
from unip.checkpoint import save_checkpoint; from unip.models import create_model
save_checkpoint(create_model('$3'), '$W/startup_teacher.safetensors', {'note': 'random teacher'})"
  rm -rf "$W/startup_run"
  start=$(date +%s.%N)
  timeout "$6" "$py" -m unip.cli pretrain mae-l_unip-s --teacher "$W/startup_teacher.safetensors" \
    --teacher-layer "$7" --data "$W/startup_ir" --out "$W/startup_run" --epochs 1 --batch-size 8 --accum-iter 1 \
    --device "$device" \
    --set optim.effective_batch=null --set run.log_every=1 --set run.progress=false --set run.save_every_steps=0 \
    > "$R/startup.log" 2>&1
  "$py" - "$W/startup_run/log.jsonl" "$start" <<'PY' | tee "$R/startup.txt"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
start = float(sys.argv[2])
steps = [r for r in records if r.get("kind") == "train"]
print("pre-training start-up: setup record after", round(records[0]["time"] - start, 1), "s; first logged step",
      steps[0]["step"] if steps else None, "after", round(steps[0]["time"] - start, 1) if steps else None, "s")
PY
}

"${@:-step}"
