# shellcheck shell=bash
# Shell functions for launch/multinode.sh and launch/slurm/*.sbatch (sourced, never run on its own).
#
# Every machine runs one `accelerate launch` (torch's elastic agent), which starts one train.py process per GPU and
# meets the other machines through a c10d rendezvous hosted by machine rank 0.
#
# How a preemption signal reaches train.py (torch 2.15, accelerate 1.15; checked in their sources and on CPU):
# - train.py stops cleanly on SIGUSR1 or SIGTERM: it finishes the optimizer update, writes checkpoints/last, exits 75.
# - The agent catches only SIGTERM, SIGINT, SIGHUP and SIGQUIT by default; any of them makes it send the same signal
#   to each worker's process group and SIGKILL whatever is left after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s by default).
#   An uncaught SIGUSR1 kills the agent itself, and with it (through srun) the step.
# - A worker's process group holds its DataLoader workers too, and torch's DataLoader workers die of a SIGTERM that
#   does not come from their parent; the training process then fails with "DataLoader worker ... is killed by signal:
#   Terminated" before it can checkpoint. SIGUSR1 is harmless to them when they inherit train.py's handler (forked
#   workers: Linux's default start method before Python 3.14).
# So the signal to use is SIGUSR1, and the agent must catch and forward it: PET_SIGNALS_TO_HANDLE (torch.distributed.run
# --signals-to-handle) adds it, and TORCH_ELASTIC_SHUTDOWN_TIMEOUT gives the workers time to write the checkpoint.
# An agent too old to know that option ignores SIGUSR1 (node_launch) instead of dying of it; the workers then get the
# signal straight from SLURM, which signals every process of a job step (proctrack/cgroup, the usual setup).
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

launch_die() {
  echo "launch: error: $*" >&2
  exit 2
}

# node_launch RANK ACCELERATE_ARGS...: become this machine's accelerate launch, rank RANK of a c10d rendezvous.
node_launch() {
  local rank=$1
  shift
  trap '' USR1
  exec accelerate launch --machine_rank "$rank" --rdzv_backend c10d --rdzv_conf "is_host=$((rank == 0))" "$@"
}

# gpus_per_node CONFIG: the processes per machine an Accelerate config describes (num_processes / num_machines).
gpus_per_node() {
  awk -F': *' '$1 == "num_processes" { p = $2 } $1 == "num_machines" { m = $2 }
               END { if (p > 0 && m > 0 && p % m == 0) print p / m; else exit 1 }' "$1" \
    || launch_die "cannot read num_processes / num_machines from $1: pass the GPUs per machine explicitly"
}

# holds_run RUN_DIR: whether train.py started a run there (its args.yaml, or a complete checkpoint; incomplete ones
# are .tmp-*). `--resume RUN_DIR` continues such a run from its newest intact checkpoint, or from the start if it
# has none yet, with the run's args.yaml as its base: a requeue needs no -c (the config and flags it repeats are the
# run's own, so they change nothing; a flag that would change the result is refused unless --resume-override).
holds_run() {
  [ -e "$1/args.yaml" ] || compgen -G "$1/checkpoints/epoch-*" >/dev/null
}

# The time-limit warning reached the batch shell: pass it to every process of the job's steps (scancel without
# --batch leaves this shell out), once; a second SIGUSR1 would cut the agents' wait for the checkpoint short.
on_warning() {
  if ((!PREEMPTED)); then
    PREEMPTED=1
    echo "launch: SIGUSR1 (time-limit warning): the workers checkpoint and exit, then the job is requeued"
    scancel --signal=USR1 "$SLURM_JOB_ID"
  fi
}

# slurm_run SCRIPT ARGS...: run SCRIPT (train.py / finetune.py) on every node of this SLURM job, in the run folder
# named after the job, resuming it when it holds a run; on the time-limit warning (sbatch --signal=B:USR1@SECONDS)
# the workers checkpoint and the job is requeued. The global batch is the config's --global-batch, which the script
# itself keeps on any node count (the per-GPU batch and accumulation steps derived from the processes it has).
# Reads: ACCELERATE_CONFIG, GPUS_PER_NODE, RUN_DIR, WEIGHTS (finetune.py only).
slurm_run() {
  local script=$1 nnodes=${SLURM_NNODES:?slurm_run runs inside a SLURM job (sbatch)} hosts head_node port procs status
  shift
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head_node=${hosts[0]:?no hosts in SLURM_JOB_NODELIST}
  port=${MAIN_PORT:-$((15000 + SLURM_JOB_ID % 20000))} # from the job id: two jobs sharing a head node do not collide
  procs=$((nnodes * GPUS_PER_NODE))

  local start=(--output-dir "$RUN_DIR")
  if holds_run "$RUN_DIR"; then
    start=(--resume "$RUN_DIR")
  elif [ -n "${WEIGHTS:-}" ]; then
    start+=(--finetune "$WEIGHTS")
  fi
  echo "launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $GPUS_PER_NODE GPUs," \
    "head $head_node:$port; $procs processes share the config's global batch; ${start[*]}"

  PREEMPTED=0
  trap on_warning USR1
  # The machine rank is the node's own $SLURM_NODEID, so it is expanded on each node, not here.
  # shellcheck disable=SC2016
  srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:?}" \
    --kill-on-bad-exit=1 \
    bash -c 'source "$0" && node_launch "$SLURM_NODEID" "$@"' "$LAUNCH_DIR/common.sh" \
    --config_file "$ACCELERATE_CONFIG" --num_machines "$nnodes" --num_processes "$procs" \
    --main_process_ip "$head_node" --main_process_port "$port" \
    "$script" "${start[@]}" "$@" &
  local srun_pid=$!
  # A trapped signal interrupts `wait` (status 138); wait until srun has ended, then ask bash for srun's own status.
  while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" || true
  done
  status=0
  wait "$srun_pid" || status=$?

  if ((PREEMPTED && status != 0)); then
    holds_run "$RUN_DIR" || launch_die "preempted before the run started in $RUN_DIR: not requeued"
    echo "launch: requeueing job $SLURM_JOB_ID; it resumes from $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$status"
}
