#!/usr/bin/env bash
# Container entrypoint for the shardwise GPU worker image.
#   no arguments           -> a Prefect worker polling $PREFECT_WORK_POOL (default: shardwise, the pool in prefect.yaml)
#   arguments starting "-"  -> the same worker, with those extra options (e.g. --limit 1)
#   anything else          -> run as given (`prefect flow-run execute`, `shardwise run ...`, `bash`)
set -euo pipefail

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- prefect worker start \
        --pool "${PREFECT_WORK_POOL:-shardwise}" \
        --type "${PREFECT_WORKER_TYPE:-process}" \
        "$@"
fi

exec "$@"
