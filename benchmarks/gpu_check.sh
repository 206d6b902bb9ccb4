#!/usr/bin/env bash
# Everything only a GPU can measure, in one pass planned for a short session on one lent GPU: at most 250 s of time
# boxes (each step is stopped at its own; cold inductor compiles included), two files out.
#
#   bash benchmarks/gpu_check.sh --prepare        # here, once: the data and the timm wheel into gpu_carry/
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # on the GPU machine (offline: what it needs was carried)
#   bash benchmarks/gpu_check.sh --cpu [OUT_DIR]  # the same plan at toy size on the CPU (CI runs it)
#
# Steps, each a table in the archive's folder gpu_check/ as soon as it ends (its log beside it):
#   env          env.txt: python, torch, CUDA, every floor of requirements.txt against what is installed (a package
#                below its floor is installed first from a carried wheel into a temporary folder put on PYTHONPATH),
#                the GPU against the torch build's kernels (benchmarks/gpu_env.py)
#   overhead     overhead.md: benchmarks/overhead.py under bf16 autocast, what TrAct costs per training step
#   throughput   throughput.md: benchmarks/throughput.py, bf16, base and compile + TrAct (inductor), train.py and bare
#   syncs        syncs.txt: real train.py steps under torch.cuda.set_sync_debug_mode("warn"): syncs per epoch, eager
#                and compiled TrAct, with the loop's own reads only after the last update (--sync-interval 1000)
#   convergence  convergence.txt, convergence/results.csv: benchmarks/convergence.py's main setting (ViT, AdamW,
#                vanilla vs TrAct 0.1) on Fashion-MNIST, bf16
#   steps.tsv    each step's exit status (124 or 137: stopped at its time box), seconds and time box
# OUT_DIR (the argument, else $OUT, else output/gpu_check/<date-time>) gets two files: gpu_check.tar.gz (the folder
# gpu_check/) and summary.md (the steps and every table). Both are rewritten after each step and when the script is
# stopped (SIGTERM, Ctrl-C), so a run cut short keeps what finished. The inductor caches are shared by all steps.
#
# Python: $PYTHON, else .venv/bin/python when it exists, else python3 (the GPU machine's). The carried folder:
# $GPU_CHECK_CARRY, else gpu_carry/. Fashion-MNIST (the four IDX .gz files): $FMNIST_DIR, else Debian's
# /usr/share/datasets/fashion-mnist, else the carried copy.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
carry=${GPU_CHECK_CARRY:-gpu_carry}
fmnist=${FMNIST_DIR:-}
for dir in /usr/share/datasets/fashion-mnist "$carry/fashion-mnist"; do
  if [ -z "$fmnist" ] && [ -d "$dir" ]; then fmnist=$dir; fi
done
if [ -n "$fmnist" ]; then fmnist=$(cd "$fmnist" && pwd); fi # convergence.py runs train.py in its run folders
FMNIST_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
DEVICE_LIMIT_MIB=64 # what travels to the lent GPU machine: the working tree and the carried folders together

die() {
  echo "gpu_check: error: $*" >&2
  exit 2
}

# ---- --prepare: what the offline GPU machine needs, in one ignored folder that travels with the working tree
if [ "${1:-}" = --prepare ]; then
  [ -n "$fmnist" ] || die "no Fashion-MNIST here: apt-get install dataset-fashion-mnist, or set FMNIST_DIR to the" \
    "folder of its four .gz files"
  git check-ignore -q "$carry/" 2>/dev/null || die "$carry/ is not a folder git ignores in this repository: only" \
    "ignored folders travel as carry (set GPU_CHECK_CARRY to one, or keep the default gpu_carry/)"
  mkdir -p "$carry/fashion-mnist" "$carry/wheels" || exit 1
  for f in "${FMNIST_FILES[@]}"; do
    [ -f "$fmnist/$f" ] || die "$fmnist/$f is missing: Fashion-MNIST's four IDX .gz files are needed"
    [ "$fmnist/$f" -ef "$carry/fashion-mnist/$f" ] || cp "$fmnist/$f" "$carry/fashion-mnist/$f" || exit 1
  done
  # the timm the tests ran with here; the GPU machine's may be older than the floor (gpu_env.py installs this one)
  timm=$("$py" -c "import timm; print(timm.__version__)") || die "no timm in $py: set PYTHON to the project's"
  if ! compgen -G "$carry/wheels/timm-$timm-*.whl" >/dev/null; then
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$carry/wheels" "timm==$timm" \
      || die "pip could not download timm $timm: from a machine that reaches PyPI, run" \
        "pip download --no-deps -d $carry/wheels timm==$timm"
  fi
  carried=$(du -sbL "$carry" | cut -f1)
  tree=$(git ls-files -co --exclude-standard -z | du -cbL --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  total_mib=$(((carried + tree) / 1048576 + 1))
  ((total_mib < DEVICE_LIMIT_MIB)) || die "the working tree and $carry/ make $total_mib MiB, over the" \
    "$DEVICE_LIMIT_MIB MiB that travel: remove untracked files"
  echo "gpu_check: $carry/ holds Fashion-MNIST and timm $timm's wheel ($((carried / 1048576)) MiB; with the working" \
    "tree about $total_mib MiB of the $DEVICE_LIMIT_MIB that travel)."
  echo "carry: [\"$(realpath -s --relative-to=. "$carry")\"]" # the path from the repository's root
  echo "command: bash benchmarks/gpu_check.sh"
  echo "timeout_s: 400 (the plan's time boxes add to 250 s; the rest is room for the archive and a slow start)"
  exit 0
fi

cpu=0
if [ "${1:-}" = --cpu ]; then cpu=1; shift; fi
out=${1:-${OUT:-output/gpu_check/$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
root=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
folder=$root/gpu_check # the archive's folder; caches, data and run folders stay beside it, outside the archive
mkdir -p "$folder" "$root/scratch"
export TORCHINDUCTOR_CACHE_DIR=$root/inductor-cache TRITON_CACHE_DIR=$root/inductor-cache/triton \
  TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1 PYTHONUNBUFFERED=1
printf 'step\tstatus\tseconds\tlimit\n' > "$folder/steps.tsv"
STEPS=(env overhead throughput syncs convergence)
TABLES=(env.txt overhead.md throughput.md syncs.txt convergence.txt)

# summary: the steps and every table, Markdown (what a reader of summary.md or of the run's output needs first)
summary() {
  local i name status code seconds limit
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $([ $cpu = 1 ] && echo "--cpu (toy size)" || echo GPU)"
  echo
  echo "| step | status | seconds | time box |"
  echo "|---|---|---|---|"
  for i in "${!STEPS[@]}"; do
    name=${STEPS[$i]}
    status=$(awk -F'\t' -v n="$name" '$1 == n { print $2 "\t" $3 "\t" $4 }' "$folder/steps.tsv")
    if [ -n "$status" ]; then
      IFS=$'\t' read -r code seconds limit <<<"$status"
      echo "| $name | $code$(case $code in 124 | 137) echo " (time box)" ;; esac) | $seconds | $limit |"
    else
      echo "| $name | not run | | |"
    fi
  done
  for i in "${!STEPS[@]}"; do
    [ -s "$folder/${TABLES[$i]}" ] || continue
    printf '\n## %s (%s)\n\n' "${STEPS[$i]}" "${TABLES[$i]}"
    cat "$folder/${TABLES[$i]}"
  done
  printf '\nEvery table and log: gpu_check.tar.gz (gpu_check/).\n'
}

# pack: the archive and the summary into OUT_DIR, each written beside and then moved, so neither is ever half there
pack() {
  tar -czf "$out/.gpu_check.tar.gz" -C "$root" --exclude=gpu_check/convergence/runs gpu_check \
    && mv -f "$out/.gpu_check.tar.gz" "$out/gpu_check.tar.gz"
  summary > "$out/.summary.md" && mv -f "$out/.summary.md" "$out/summary.md"
}

# the step in flight: its process, name, start and time box (finish records it as stopped)
running="" current="" started=0 box=0
record() { printf '%s\t%s\t%s\t%s\n' "$current" "$1" "$(($(date +%s) - started))" "$box" >> "$folder/steps.tsv"; }
finish() {
  trap - EXIT TERM INT
  if [ -n "$running" ]; then
    kill -TERM "$running" 2>/dev/null
    wait "$running" 2>/dev/null
    record stopped
  fi
  pack
  rm -rf "$root"
}
trap finish EXIT
trap 'echo "gpu_check: stopped; the archive keeps the steps that ended" >&2; exit 143' TERM INT

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, stdout to the step's table, stderr to NAME.log; in
# the background, so that a stop of the script ends the step at once
step() {
  local i status table=""
  current=$1 box=$2 started=$(date +%s)
  shift 2
  for i in "${!STEPS[@]}"; do [ "${STEPS[$i]}" = "$current" ] && table=${TABLES[$i]}; done
  echo "gpu_check: $current (at most ${box}s)" >&2
  timeout --kill-after=5 "$box" "$@" > "$folder/$table" 2>> "$folder/$current.log" &
  running=$!
  wait "$running"
  status=$?
  running=""
  record "$status"
  [ "$status" = 0 ] || echo "gpu_check: $current ended with status $status (124, or 137 when it outlived the" \
    "time box by 5 s: stopped at its time box; see $current.log)" >&2
  pack
}

if [ $cpu = 1 ]; then
  # toy sizes: the smallest model of each benchmark, a few updates, a generated image folder
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
  data=$root/scratch/toy-data
  "$py" -c "import sys; sys.path.insert(0, 'benchmarks'); from throughput import write_images
write_images(__import__('pathlib').Path(sys.argv[1]), per_class=8, size=32)" "$data"
  overhead=(--device cpu --models cifar_vit --batch-size 4 --reps 1 --warmup 0)
  throughput=(--device cpu --batch-size 8 --updates 3 --warmup 1 --reps 1 --threads 1 --workers 0
              --compile-backend aot_eager --variants base "compile + TrAct")
  train_data=(--data-set FOLDER --data-path "$data" --input-size 28 --batch-size 8 --max-updates-per-epoch 3)
  compile_backend=aot_eager
  convergence=(--budgets 1 --seeds 0 --updates-per-epoch 2 --in-chans 3 --n-boot 50
               --train-args --data-set FOLDER --data-path "$data" --input-size 28 --num-workers 0 --batch-size 8)
  limits=(60 60 120 120 120) # CI's 2 shared cores
else
  [ -n "$fmnist" ] || echo "gpu_check: no Fashion-MNIST (run --prepare where it is, and carry $carry): the syncs" \
    "and convergence steps will fail" >&2
  overhead=(--device cuda --amp bf16 --reps 50)
  throughput=(--device cuda --amp bf16 --batch-size 256 --updates 12 --reps 1 --workers 4
              --variants base "compile + TrAct")
  train_data=(--data-set FMNIST --data-path "$fmnist" --batch-size 256
              --max-updates-per-epoch 20 --mixed-precision bf16)
  compile_backend=inductor
  convergence=(--budgets 1 2 --seeds 0 --updates-per-epoch 100 --threads 4 --n-boot 200
               --train-args --data-set FMNIST --data-path "$fmnist" --num-workers 4
               --mixed-precision bf16)
  # 250 s with the wheel's 20: cold inductor compiles are most of throughput's (2 of its 4 processes compile the
  # same model, the second from the shared cache) and of syncs' (a train and an eval graph)
  limits=(20 30 75 55 50)
fi

# a package below its floor (the GPU machine's timm may be): its carried wheel, into a folder put first on PYTHONPATH
mapfile -t wheels < <("$py" benchmarks/gpu_env.py --wheels "$carry/wheels" 2>> "$folder/env.log")
if [ ${#wheels[@]} -gt 0 ]; then
  echo "gpu_check: installing ${wheels[*]} (below the floor here) into $root/site" >&2
  echo "installing the carried ${wheels[*]}" >> "$folder/env.log"
  timeout 20 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$root/site" \
    "${wheels[@]}" >> "$folder/env.log" 2>&1 && export PYTHONPATH=$root/site${PYTHONPATH:+:$PYTHONPATH}
fi
step env "${limits[0]}" "$py" benchmarks/gpu_env.py
step overhead "${limits[1]}" "$py" benchmarks/overhead.py "${overhead[@]}"
step throughput "${limits[2]}" "$py" benchmarks/throughput.py "${throughput[@]}"
cat > "$root/scratch/syncs.py" <<'EOF'
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
step syncs "${limits[3]}" "$py" "$root/scratch/syncs.py" "$root/scratch/syncs-runs" "$compile_backend" "${train_data[@]}"
step convergence "${limits[4]}" "$py" benchmarks/convergence.py --studies main --lr adam=0.001 --lambdas 0.1 \
  --out-dir "$folder/convergence" "${convergence[@]}"

trap - EXIT TERM INT
pack
failed=$(awk -F'\t' 'NR > 1 && $2 != 0 { printf "%s ", $1 }' "$folder/steps.tsv")
rm -rf "$root"
cat "$out/summary.md"
echo "gpu_check: $out/gpu_check.tar.gz and $out/summary.md${failed:+; failed: $failed}" >&2
[ -z "$failed" ]
