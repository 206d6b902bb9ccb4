#!/usr/bin/env bash
# Multi-node training without SLURM: run this on every machine with the same arguments, plus each machine's rank
# (--machine-rank) or one shared hostfile (--hostfile: a machine's rank is the line of its host name or address).
#
#   # 2 machines of 4 x A40 listed in hosts.txt; the config's global batch 2048 = 256 x 8 x 1 (train.py derives it)
#   launch/multinode.sh --config launch/accelerate/a40x4_multinode.yaml --hostfile hosts.txt \
#       train.py -c configs/deit3_vit_s_400ep.yaml --data-path /data/imagenet
#   # 2 machines of 8 x V100, this one the main one (10.0.0.1); global batch 2048 = 128 x 16 x 1
#   launch/multinode.sh --config launch/accelerate/v100x8_multinode.yaml --nnodes 2 --machine-rank 0 \
#       --main-ip 10.0.0.1 train.py -c configs/deit3_vit_b_400ep_192.yaml --data-path /data/imagenet
#
# Options (environment variable in brackets; a hostfile supplies the node count and, from its first line, the main IP):
#   --config FILE         Accelerate config of one machine's GPUs (required)
#   --hostfile FILE       one host per line (first word; blank lines and # comments skipped); line 1 is rank 0
#   --machine-rank R      this machine's rank, 0 on the main machine                            [NODE_RANK]
#   --nnodes N            number of machines                                                    [NNODES]
#   --main-ip IP          address of the rank-0 machine, reachable from all                     [MASTER_ADDR]
#   --main-port P         free TCP port on the rank-0 machine (default 29500)                   [MASTER_PORT]
#   --gpus-per-node G     processes per machine (default: num_processes / num_machines of the config) [GPUS_PER_NODE]
# Everything from the script name on goes to `accelerate launch`. SIGUSR1 to this process on any machine (it becomes
# accelerate launch) makes all workers stop after the same update, checkpoint and exit (train.py: status 75, the
# launcher: 1); the same command plus `--resume RUN_DIR` continues the run.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
}

config="" hostfile="" rank=${NODE_RANK:-} nnodes=${NNODES:-} main_ip=${MASTER_ADDR:-} main_port=${MASTER_PORT:-29500}
gpus=${GPUS_PER_NODE:-}
while [ $# -gt 0 ]; do
  case $1 in
    --config) config=${2:?--config needs a file} ;;
    --hostfile) hostfile=${2:?--hostfile needs a file} ;;
    --machine-rank) rank=${2:?--machine-rank needs a number} ;;
    --nnodes) nnodes=${2:?--nnodes needs a number} ;;
    --main-ip) main_ip=${2:?--main-ip needs an address} ;;
    --main-port) main_port=${2:?--main-port needs a port} ;;
    --gpus-per-node) gpus=${2:?--gpus-per-node needs a number} ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) launch_die "unknown option $1 (see --help); the training script's own options come after its name" ;;
    *) break ;;
  esac
  shift 2
done
[ $# -gt 0 ] || launch_die "no training script given (e.g. train.py -c configs/deit3_vit_s_400ep.yaml ...)"
[ -n "$config" ] || launch_die "--config FILE is required (e.g. launch/accelerate/a40x4_multinode.yaml)"
[ -f "$config" ] || launch_die "--config $config: no such file"

if [ -n "$hostfile" ]; then
  [ -f "$hostfile" ] || launch_die "--hostfile $hostfile: no such file"
  mapfile -t hosts < <(awk '!/^[[:space:]]*(#|$)/ { print $1 }' "$hostfile")
  [ ${#hosts[@]} -gt 0 ] || launch_die "--hostfile $hostfile lists no hosts"
  nnodes=${nnodes:-${#hosts[@]}}
  main_ip=${main_ip:-${hosts[0]}}
  if [ -z "$rank" ]; then
    # shellcheck disable=SC2207  # word-splitting the names and addresses is the point
    me=($(hostname) $(hostname -s) $(hostname -f 2>/dev/null) $(hostname -I 2>/dev/null))
    for i in "${!hosts[@]}"; do
      for name in "${me[@]}"; do
        [ "${hosts[$i]}" = "$name" ] && rank=$i && break 2
      done
    done
    [ -n "$rank" ] || launch_die "this machine (${me[*]}) is not in --hostfile $hostfile: add it, or pass --machine-rank"
  fi
fi
[ -n "$rank" ] || launch_die "pass --machine-rank R (0 on the main machine) or --hostfile FILE"
[ -n "$nnodes" ] || launch_die "pass --nnodes N (or --hostfile FILE)"
[ -n "$main_ip" ] || launch_die "pass --main-ip IP of the rank-0 machine (or --hostfile FILE)"
[[ $rank =~ ^[0-9]+$ && $nnodes =~ ^[0-9]+$ && $rank -lt $nnodes ]] \
  || launch_die "machine rank $rank must be a whole number below the node count $nnodes"
gpus=${gpus:-$(gpus_per_node "$config")}

echo "multinode: machine $rank of $nnodes, $gpus processes here, main $main_ip:$main_port" >&2
node_launch "$rank" --config_file "$config" --num_machines "$nnodes" --num_processes "$((nnodes * gpus))" \
  --main_process_ip "$main_ip" --main_process_port "$main_port" "$@"
