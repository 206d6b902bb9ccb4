#!/usr/bin/env bash
# Everything only a GPU can measure, in one pass that fits a short lent-GPU session (about 8 minutes on one GPU):
#   1. env.txt          torch, CUDA, the GPU, its architecture against the build's kernels (tract.runtime.check_cuda)
#   2. overhead.md      benchmarks/overhead.py on CUDA under bf16 autocast: what TrAct costs per training step
#   3. throughput.md    benchmarks/throughput.py, bf16: eager / compile / compile + TrAct / channels-last
#   4. syncs.txt        real train.py steps under torch.cuda.set_sync_debug_mode("warn"): syncs per epoch, eager and
#                       compiled TrAct, with the loop's own reads only after the last update (--sync-interval 1000)
#   5. convergence/     benchmarks/convergence.py's main setting (ViT, AdamW, vanilla vs TrAct 0.1) on Fashion-MNIST
#   steps.tsv           each step's exit status and seconds; every step is time-boxed, so one hang costs only itself
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu [OUT_DIR]    # the same plan at toy size on the CPU (CI runs it, < 1 minute)
#
# OUT_DIR: the argument, else $OUT, else output/gpu_check/<date-time>. Python: $PYTHON, else .venv/bin/python when it
# exists, else python3 (a bare GPU machine's). Fashion-MNIST (the four IDX .gz files): $FMNIST_DIR, else Debian's
# /usr/share/datasets/fashion-mnist, else data/fashion-mnist in the repository (a copy carried along: 30 MiB).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

cpu=0
if [ "${1:-}" = --cpu ]; then cpu=1; shift; fi
out=${1:-${OUT:-output/gpu_check/$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fmnist=${FMNIST_DIR:-}
for dir in /usr/share/datasets/fashion-mnist data/fashion-mnist; do
  if [ -z "$fmnist" ] && [ -d "$dir" ]; then fmnist=$dir; fi
done
printf 'step\tstatus\tseconds\n' > "$out/steps.tsv"

# step NAME SECONDS OUTPUT_FILE COMMAND...: run COMMAND for at most SECONDS, stdout to OUTPUT_FILE, stderr to NAME.log
step() {
  local name=$1 limit=$2 file=$3 start status
  shift 3
  start=$(date +%s)
  echo "gpu_check: $name (at most ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" > "$file" 2> "$out/$name.log"
  status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >> "$out/steps.tsv"
  [ "$status" = 0 ] || echo "gpu_check: $name ended with status $status (124: time limit; see $out/$name.log)" >&2
}

if [ $cpu = 1 ]; then
  # toy sizes: the smallest model of each benchmark, a few updates, a generated image folder
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
  data=$out/toy-data
  "$py" -c "import sys; sys.path.insert(0, 'benchmarks'); from throughput import write_images
write_images(__import__('pathlib').Path(sys.argv[1]), per_class=8, size=32)" "$data"
  overhead=(--device cpu --models cifar_vit --batch-size 4 --reps 1 --warmup 0)
  throughput=(--device cpu --batch-size 8 --updates 3 --warmup 1 --reps 1 --threads 1 --workers 0
              --compile-backend aot_eager --variants "compile + TrAct")
  train_data=(--data-set FOLDER --data-path "$data" --input-size 28 --batch-size 8 --max-updates-per-epoch 3)
  compile_backend=aot_eager
  convergence=(--budgets 1 --seeds 0 --updates-per-epoch 2 --in-chans 3 --n-boot 50
               --train-args --data-set FOLDER --data-path "$data" --input-size 28 --num-workers 0 --batch-size 8)
  limits=(60 60 120 120 120)
else
  [ -n "$fmnist" ] || { echo "gpu_check: no Fashion-MNIST: set FMNIST_DIR to the folder of its four .gz files" >&2
                        exit 2; }
  overhead=(--device cuda --amp bf16 --reps 50)
  throughput=(--device cuda --amp bf16 --batch-size 256 --updates 20 --reps 1 --workers 4
              --variants base compile "compile + TrAct" channels-last)
  train_data=(--data-set FMNIST --data-path "$fmnist" --batch-size 256 --max-updates-per-epoch 50
              --mixed-precision bf16)
  compile_backend=inductor
  convergence=(--budgets 1 2 4 --seeds 0 1 --updates-per-epoch 100 --threads 4
               --train-args --data-set FMNIST --data-path "$fmnist" --num-workers 4 --mixed-precision bf16)
  limits=(30 90 200 60 150)
fi

step env "${limits[0]}" "$out/env.txt" "$py" - <<'EOF'
import platform
import sys

import torch

sys.path.insert(0, ".")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    from tract.runtime import check_cuda

    for i in range(torch.cuda.device_count()):
        print(f"GPU {i}: {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
    print("kernels for:", " ".join(torch.cuda.get_arch_list()))
    check_cuda("bf16")
    print("tract.runtime.check_cuda: this torch runs on these GPUs")
else:
    print("no CUDA GPU: the toy-size plan (--cpu)")
EOF
step overhead "${limits[1]}" "$out/overhead.md" "$py" benchmarks/overhead.py "${overhead[@]}"
step throughput "${limits[2]}" "$out/throughput.md" "$py" benchmarks/throughput.py "${throughput[@]}"
step syncs "${limits[3]}" "$out/syncs.txt" "$py" - "$out/syncs-runs" "$compile_backend" "${train_data[@]}" <<'EOF'
"""train.py's host syncs per epoch (CUDA's sync debug mode counts them; on the CPU the runs only prove the path)."""
import contextlib
import sys
import warnings

import torch

sys.path.insert(0, ".")
import train  # noqa: E402

runs, backend, data_args = sys.argv[1], sys.argv[2], sys.argv[3:]
counts = []
original = train.train_one_epoch


def counting(model, loader, optimizer, scheduler, criterion, accelerator, state, updates_per_epoch, **kwargs):
    cuda = accelerator.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            return original(model, loader, optimizer, scheduler, criterion, accelerator, state, updates_per_epoch,
                            **kwargs)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            counts.append(f"{updates_per_epoch} updates, {syncs if cuda else 'n/a (no CUDA)'} syncs")


train.train_one_epoch = counting
print("train.py, 1 epoch, --sync-interval 1000 (the loop reads the device after the last update only)")
for name, extra in (("TrAct, eager", []), (f"TrAct, compiled ({backend})", ["--torchcompile", backend])):
    from accelerate.state import AcceleratorState, GradientState

    with contextlib.redirect_stdout(sys.stderr):  # train.py's own report goes to the step's log
        train.main([*data_args, "--tract", "--epochs", "1", "--sync-interval", "1000", "--no-progress",
                    "--output-dir", f"{runs}/{len(counts)}", *extra])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    print(f"{name}: {counts[-1]}", flush=True)
EOF
step convergence "${limits[4]}" "$out/convergence.txt" "$py" benchmarks/convergence.py --studies main \
  --lr adam=0.001 --lambdas 0.1 --out-dir "$out/convergence" "${convergence[@]}"

rm -rf "$out/toy-data" "$out/syncs-runs" "$out/convergence/runs"
echo "gpu_check: results in $out" >&2
column -t "$out/steps.tsv" >&2 2>/dev/null || cat "$out/steps.tsv" >&2
! grep -qv -P '\t0\t|^step\t' "$out/steps.tsv"
