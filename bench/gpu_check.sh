#!/usr/bin/env bash
# GPU readiness: every script for a few steps on CUDA, then the D14 / XL sampling speed-up at the
# paper's setting against its 1.96x, and the images/s of D14 and XL with the fast solvers
# (dpm-solver++, unipc) at 20 model evaluations instead of DDPM's 250. One PASS / FAIL line per
# check, a summary line, exit 1 if a check failed; each check's full output goes to
# WORK/logs/<check>.log.
#
#   bench/gpu_check.sh                  # a CUDA machine: nccl with 2 ranks when 2 GPUs are visible
#   bench/gpu_check.sh --cpu-dry-run    # the same checks on the CPU (gloo, 2 ranks, tiny model, tiny steps)
#
# Options: --out DIR (work folder; default a temporary one, deleted when every check passed),
# --keep (keep it anyway), --skip-ratio (skip the paper-setting measurements, minutes on a GPU);
# PYTHON selects the interpreter. The data are made on the fly (scikit-learn's digits, pixel
# space: --vae none), so nothing is downloaded; the paper-setting ratio uses random weights (speed
# does not depend on them). The dry-run measures the ratio with a tiny stand-in of XL's depth and
# only reports it.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MODE=gpu WORK="" KEEP=0 RATIO=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) MODE=cpu-dry-run ;;
    --out) WORK="$2"; shift ;;
    --keep) KEEP=1 ;;
    --skip-ratio) RATIO=0 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = gpu ]; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$GPUS" -lt 1 ]; then
    echo "error: no CUDA GPU is visible to $PYTHON (torch.cuda.device_count() = 0); on a CPU run" \
         "bench/gpu_check.sh --cpu-dry-run" >&2
    exit 2
  fi
  NPROC=$(( GPUS >= 2 ? 2 : 1 )) DEVICE=cuda BACKEND=nccl
  MODEL=DiT-S/2 SIZE=32 STEPS=5                      # 256 tokens of width 384: real GPU kernels, seconds
  RATIO_FLAGS=(--min-speedup 1.76)                   # within 10% of the paper's 1.96x
  SOLVER_FLAGS=()                                    # the paper's setting: 256 px, batch 32, cfg 1.5
else
  export CUDA_VISIBLE_DEVICES=""                     # the CPU even on a GPU machine
  export OMP_NUM_THREADS=1                           # tiny models: spinning threads only cost time
  NPROC=2 DEVICE=cpu BACKEND=gloo
  MODEL=DiT-XS/4 SIZE=8 STEPS=2                      # the quick start's 12-block model on 8x8 digits
  RATIO_FLAGS=(--stand-in --steps 10 --batch 4 --image-size 64 --threads 1)
  SOLVER_FLAGS=(--stand-in --batch 4 --image-size 64 --threads 1)
fi
TEMPORARY=0
if [ -z "$WORK" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") && TEMPORARY=1; fi
mkdir -p "$WORK/logs" "$WORK/pruned" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SLUG=${MODEL//\//-}
COMMON=(--model "$MODEL" --image-size "$SIZE" --vae none --num-classes 10)
TRAIN=(--data-path "$WORK/features" --results-dir "$WORK/runs" --max-steps "$STEPS" --global-batch-size 8
       --log-every 1 --ckpt-every "$STEPS" --num-workers 0 --device "$DEVICE")
SAMPLE=(--num-fid-samples 16 --per-proc-batch-size 8 --num-sampling-steps 5 --cfg-scale 1.5)
TEACHER="$WORK/runs/teacher-$SLUG/checkpoints/$(printf %07d "$STEPS").pt"
STUDENT="$WORK/runs/kd-$SLUG/checkpoints/$(printf %07d "$STEPS").pt"
PASSED=0 FAILED=0

torchrun() { "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$ROOT/$1" "${@:2}"; }
script() { "$PYTHON" "$ROOT/$1" "${@:2}"; }

# check NAME NEEDS COMMAND...: run COMMAND (a function or script call) if every path in NEEDS
# (space-separated, may be empty) exists; print PASS or FAIL with the time and the log's tail.
check() {
  local name=$1 needs=$2 start=$SECONDS log="$WORK/logs/${1%% *}.log" path
  shift 2
  for path in $needs; do
    if [ ! -e "$path" ]; then
      printf 'FAIL  %-46s  not run: %s is missing (an earlier check failed)\n' "$name" "${path#"$WORK"/}"
      FAILED=$((FAILED + 1))
      return
    fi
  done
  if "$@" >"$log" 2>&1; then
    printf 'PASS  %-46s  %4ds\n' "$name" $((SECONDS - start))
    PASSED=$((PASSED + 1))
  else
    printf 'FAIL  %-46s  %4ds  log: %s\n' "$name" $((SECONDS - start)) "$log"
    tail -n 5 "$log" | sed 's/^/        /'
    FAILED=$((FAILED + 1))
  fi
}

process_group() {  # an all_reduce over the ranks on the chosen backend
  cat >"$WORK/all_reduce.py" <<EOF
import torch, torch.distributed as dist
from tinyfusion.distributed import cleanup_distributed, setup_distributed
ctx = setup_distributed()
value = torch.full((1,), float(ctx.rank + 1), device=ctx.device)
if ctx.is_distributed:
    dist.all_reduce(value)
assert ctx.backend == "$BACKEND" and value.item() == ctx.world_size * (ctx.world_size + 1) / 2, (ctx, value)
print(f"rank {ctx.rank}/{ctx.world_size} on {ctx.device}: {ctx.backend} all_reduce ok")
cleanup_distributed()
EOF
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$WORK/all_reduce.py"
}
make_data() {
  script tools/make_digits.py --out "$WORK/digits" --image-size "$SIZE" --limit 64 &&
  script tools/train_digits_classifier.py --out "$WORK/classifier.pt" --ref-out "$WORK/reference.npz" \
    --image-size "$SIZE" --epochs 1 --threads 2 --overwrite
}
extract() {
  torchrun extract_features.py "${COMMON[@]}" --data-path "$WORK/digits" --features-path "$WORK/features" \
    --batch-size 16 --shard-size 16 --num-workers 0 && test -f "$WORK/features/manifest.json"
}
train() {  # train PREFIX PRECISION
  torchrun train.py "${COMMON[@]}" "${TRAIN[@]}" --prefix "$1" --precision "$2" &&
  test -f "$WORK/runs/$1-$SLUG/checkpoints/$(printf %07d "$STEPS").pt"
}
prune_learned() {
  torchrun prune_by_learning.py "${COMMON[@]}" "${TRAIN[@]}" --groups "[[1,2]]*6" --load-weight "$TEACHER" \
    --prefix prune --delta-w --lora --save-model "$WORK/pruned/learned.pt" && test -f "$WORK/pruned/learned.pt"
}
prune_score() {
  script prune_by_score.py "${COMMON[@]}" --ckpt "$TEACHER" --features-path "$WORK/features" --n-pruned 6 \
    --nsamples 16 --batch-size 8 --device "$DEVICE" --save-model "$WORK/pruned/score.pt" && test -f "$WORK/pruned/score.pt"
}
prune_index() {
  script prune_by_index.py "${COMMON[@]}" --ckpt "$TEACHER" --kept-indices "[0, 2, 4, 7, 9, 11]" \
    --save-model "$WORK/pruned/oracle.pt" && test -f "$WORK/pruned/oracle.pt"
}
distill() {
  torchrun train_masked_kd.py "${COMMON[@]}" "${TRAIN[@]}" --prefix kd --load-weight "$WORK/pruned/learned.pt" \
    --teacher "$MODEL" --load-teacher "$TEACHER" && test -f "$STUDENT"
}
sample_grid() {
  script sample.py "${COMMON[@]}" --ckpt "$STUDENT" --num-sampling-steps 5 --class-labels 0 1 2 3 \
    --out "$WORK/sample.png" && test -f "$WORK/sample.png"
}
sample_many() {  # sample_many PRECISION [SAMPLER]: the .npz goes to WORK/samples/PRECISION[-SAMPLER]/
  local dir="$WORK/samples/$1${2:+-$2}"
  torchrun sample_ddp.py "${COMMON[@]}" "${SAMPLE[@]}" --ckpt "$STUDENT" --sample-dir "$dir" \
    --precision "$1" --sampler "${2:-ddpm}" && ls "$dir"/*.npz
}
evaluate() {
  script evaluator.py "$WORK/reference.npz" "$(ls "$WORK"/samples/fp32/*.npz)" --feature-net "$WORK/classifier.pt" \
    --device "$DEVICE" --batch-size 8 --json "$WORK/eval.json" && test -f "$WORK/eval.json"
}
ratio() {
  "$PYTHON" "$ROOT/bench/bench_sampling_ratio.py" "${RATIO_FLAGS[@]}" --json "$WORK/ratio.json" &&
  grep "speed-up over XL" "$WORK/logs/ratio.log" >&3
}
solvers() {  # the fast solvers at 20 steps (NFE 20) against the DDPM 250 of ratio: images/s of D14 and XL
  local sampler
  for sampler in dpm-solver++ unipc; do
    "$PYTHON" "$ROOT/bench/bench_sampling_ratio.py" "${SOLVER_FLAGS[@]}" --sampler "$sampler" --steps 20 \
      --json "$WORK/solver-$sampler.json" || return 1
  done
  grep -E "at NFE|speed-up over XL" "$WORK/logs/solvers.log" | sed 's/^/      /' >&3
}

echo "gpu_check ($MODE): $NPROC rank(s), $BACKEND, $DEVICE; $MODEL at $SIZE px; work folder $WORK"
exec 3>&1  # ratio prints its result line on the console too
check "process-group ($NPROC ranks, $BACKEND)" "" process_group
check "data (make_digits, train_digits_classifier)" "" make_data
check "extract_features ($NPROC ranks)" "$WORK/digits" extract
check "train ($NPROC ranks, fp32)" "$WORK/features" train teacher fp32
check "train-bf16 ($NPROC ranks)" "$WORK/features" train teacher-bf16 bf16
check "train-fp16 ($NPROC ranks, GradScaler)" "$WORK/features" train teacher-fp16 fp16
check "prune_by_learning ($NPROC ranks, LoRA)" "$TEACHER" prune_learned
check "prune_by_score" "$TEACHER" prune_score
check "prune_by_index" "$TEACHER" prune_index
check "train_masked_kd ($NPROC ranks)" "$WORK/pruned/learned.pt" distill
check "sample" "$STUDENT" sample_grid
check "sample_ddp ($NPROC ranks, fp32)" "$STUDENT" sample_many fp32
check "sample_ddp-bf16 ($NPROC ranks)" "$STUDENT" sample_many bf16
check "sample_ddp-fp16 ($NPROC ranks)" "$STUDENT" sample_many fp16
check "sample_ddp-dpm-solver++ ($NPROC ranks)" "$STUDENT" sample_many fp32 dpm-solver++
check "evaluator (digits feature network)" "$WORK/samples/fp32 $WORK/classifier.pt" evaluate
if [ "$RATIO" = 1 ]; then
  if [ "$MODE" = gpu ]; then
    check "ratio D14/XL, paper setting (>= 1.76x)" "" ratio
  else
    check "ratio D14/XL, stand-in (reported only)" "" ratio
  fi
  check "solvers at NFE 20: images/s (reported only)" "" solvers
fi
if [ "$FAILED" -eq 0 ] && [ "$TEMPORARY" = 1 ] && [ "$KEEP" = 0 ]; then
  rm -rf "$WORK"
  echo "gpu_check ($MODE): all $PASSED checks passed"
else
  echo "gpu_check ($MODE): $PASSED passed, $FAILED failed; logs in $WORK/logs"
fi
[ "$FAILED" -eq 0 ]
