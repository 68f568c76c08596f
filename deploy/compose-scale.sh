#!/bin/sh
# Scale compose workers by hand on KEDA's rule (deploy/k8s/keda-scaledobject.yaml):
# workers = ceil(backlog / THRESHOLD), kept within MIN..MAX. Run it from the project folder,
# once or from cron:   sh deploy/compose-scale.sh   (THRESHOLD=2000 MIN=1 MAX=40; DRY_RUN=1
# only prints). The backlog is batchery_backlog_jobs, read by `batchery status --json` in a
# running worker container.
set -eu
THRESHOLD=${THRESHOLD:-2000}
MIN=${MIN:-1}
MAX=${MAX:-40}
status=$(docker compose exec -T worker batchery status --json)
backlog=$(printf '%s' "$status" | python3 -c 'import json, sys; print(int(json.load(sys.stdin)["backlog_jobs"]))')
workers=$(( (backlog + THRESHOLD - 1) / THRESHOLD ))
[ "$workers" -lt "$MIN" ] && workers=$MIN
[ "$workers" -gt "$MAX" ] && workers=$MAX
echo "backlog $backlog jobs, threshold $THRESHOLD a worker: $workers workers"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec docker compose up -d --no-recreate --scale worker="$workers" worker
