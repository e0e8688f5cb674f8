#!/usr/bin/env bash
# Run train.py under torchrun on this node: one process per GPU, on one node or several, with
# elastic restarts that resume from the newest training state. Arguments go to train.py unchanged.
#
# One node, every GPU:
#   bash launch/torchrun.sh --outdir=training-runs --data=datasets/cifar10-32x32.zip --pfgmpp=1 --aug_dim=2048
# Two nodes, c10d rendezvous (the same command on both nodes; restarts work across nodes):
#   NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=cifar10-run1 bash launch/torchrun.sh --outdir=... --data=...
# Two nodes, static ranks (NODE_RANK=0 on the node at MASTER_ADDR, NODE_RANK=1 on the other):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash launch/torchrun.sh --outdir=... --data=...
# SLURM: launch/slurm.sbatch runs this script once per node. More in docs/scaling.md.
#
# Settings (environment variables):
#   NPROC_PER_NODE  processes on this node                 [number of visible GPUs, or 1 without GPUs]
#   NNODES          nodes in the job                       [1: torchrun --standalone, a free local port]
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, on one of the nodes (multi-node, preferred)
#   RDZV_ID         name shared by the nodes of one job    [pfgmpp]
#   NODE_RANK, MASTER_ADDR, MASTER_PORT   static multi-node instead of RDZV_ENDPOINT [MASTER_PORT 29500]
#   MAX_RESTARTS    restarts of all workers after a failure [0]
#   RESUME          --resume=RESUME is added unless the arguments have --resume or --transfer
#                   [auto: continue from the newest state of the run; empty: add nothing]
#   SCRIPT          the program to run                     [train.py of this repository]
#   PYTHON          the Python that has PyTorch            [python3]
#   TORCHRUN        the launcher command                   [$PYTHON launch/elastic.py: torchrun whose exit
#                   status is 0 when a job-wide SIGTERM stopped every worker cleanly]
#   DRY_RUN=1       print the torchrun command instead of running it
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[0-9]+$ ]]; }

if [[ ${1:-} == "-h" || ${1:-} == "--help" ]]; then
    usage
    echo "train.py's own options: python train.py --help"
    exit 0
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
script=${SCRIPT:-$root/train.py}
[[ -f $script ]] || die "SCRIPT=$script does not exist"
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi > /dev/null && gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU'); then
        ((gpus > 0)) && NPROC_PER_NODE=$gpus
    fi
fi
nnodes=${NNODES:-1}
max_restarts=${MAX_RESTARTS:-0}
is_count "$NPROC_PER_NODE" && ((NPROC_PER_NODE > 0)) || die "NPROC_PER_NODE=$NPROC_PER_NODE: give the number of processes (GPUs) on this node"
is_count "$nnodes" && ((nnodes > 0)) || die "NNODES=$nnodes: give the number of nodes"
is_count "$max_restarts" || die "MAX_RESTARTS=$max_restarts: give a number of restarts such as 3"

options=(--nproc_per_node="$NPROC_PER_NODE" --max_restarts="$max_restarts")
if ((nnodes == 1)); then
    options+=(--standalone --nnodes=1)
elif [[ -n ${RDZV_ENDPOINT:-} ]]; then
    [[ $RDZV_ENDPOINT == *:* ]] || die "RDZV_ENDPOINT=$RDZV_ENDPOINT: give host:port of one of the nodes, e.g. node0:29400"
    options+=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-pfgmpp}")
    # A store shared across restarts hands restarted workers the previous attempt's addresses
    # (pytorch/pytorch#135712): give each rendezvous round a fresh one.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
else
    [[ -n ${MASTER_ADDR:-} ]] || die "NNODES=$nnodes: set RDZV_ENDPOINT=host:port (c10d), or NODE_RANK and MASTER_ADDR (static)"
    is_count "${NODE_RANK:-x}" && ((NODE_RANK < nnodes)) || die "NODE_RANK=${NODE_RANK:-}: give this node's rank, 0 to $((nnodes - 1))"
    options+=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
fi

arguments=("$@")
resume=${RESUME-auto}
if [[ -n $resume && $(basename "$script") == train.py ]]; then
    explicit=0
    for argument in "$@"; do
        [[ $argument == --resume* || $argument == --transfer* ]] && explicit=1
    done
    ((explicit)) || arguments+=(--resume="$resume")
fi

read -r -a launcher <<< "${TORCHRUN:-${PYTHON:-python3} $root/launch/elastic.py}"
command -v "${launcher[0]}" > /dev/null \
    || die "'${launcher[0]}' not found: activate the environment that has PyTorch (. .venv/bin/activate), or set PYTHON or TORCHRUN"
command=("${launcher[@]}" "${options[@]}" "$script" "${arguments[@]}")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"
