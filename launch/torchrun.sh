#!/usr/bin/env bash
# Launch launch/train.py with torchrun, on one node or several.
#
#   launch/torchrun.sh --ckpt-dir /shared/ck --steps 1000            # one node, all local GPUs (or 1 CPU rank)
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh --ckpt-dir /shared/ck   # on every node (c10d rendezvous)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh ...    # static rendezvous, fixed node ranks
#
# Every argument is passed to train.py. Environment:
#   NPROC_PER_NODE  ranks per node (default: the number of GPUs, else 1)
#   NNODES          nodes (default 1; with 1 and no MASTER_ADDR: --standalone)
#   MASTER_ADDR     rendezvous host (c10d) or rank-0 host (static); MASTER_PORT (default 29500)
#   RDZV_ENDPOINT   host:port overriding MASTER_ADDR:MASTER_PORT for c10d; RDZV_ID (default dist_ckpt)
#   RDZV_CONF       extra c10d settings, e.g. is_host=1 on the node that should serve the rendezvous
#                   when torchrun cannot tell from the hostname (an address on a secondary interface)
#   LOCAL_ADDR      this node's address as the other nodes reach it (torchrun --local-addr; default:
#                   its FQDN, which must then resolve to a reachable address)
#   NODE_RANK       set it to use static rendezvous (--node-rank) instead of c10d
#   DIST_CKPT_COORDINATOR  tcp://host:port for the checkpoint coordinator. Left unset unless you set
#                   it: by default rank 0 binds the interface that routes towards MASTER_ADDR on a free port.
#   PYTHON          interpreter (default: the repository's .venv, else python3)
#   TRAIN           script to run (default: launch/train.py)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
TRAIN=${TRAIN:-$HERE/train.py}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi

args=(--nproc-per-node "$NPROC_PER_NODE")
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  args+=(--standalone)
elif [ -n "${NODE_RANK:-}" ]; then
  : "${MASTER_ADDR:?static rendezvous (NODE_RANK set) needs MASTER_ADDR}"
  args+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
else
  endpoint=${RDZV_ENDPOINT:-${MASTER_ADDR:?multi-node c10d rendezvous needs MASTER_ADDR or RDZV_ENDPOINT}:$MASTER_PORT}
  args+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "${RDZV_ID:-dist_ckpt}")
  [ -z "${RDZV_CONF:-}" ] || args+=(--rdzv-conf "$RDZV_CONF")
  [ -z "${LOCAL_ADDR:-}" ] || args+=(--local-addr "$LOCAL_ADDR")
fi

if [ -n "${DIST_CKPT_COORDINATOR:-}" ]; then
  echo "torchrun.sh: checkpoint coordinator at $DIST_CKPT_COORDINATOR (DIST_CKPT_COORDINATOR)" >&2
  export DIST_CKPT_COORDINATOR
fi

echo "torchrun.sh: $(hostname): torchrun ${args[*]} $TRAIN $*" >&2
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "$TRAIN" "$@"
