#!/usr/bin/env bash
# The main job end to end on embedded defaults: builds unitsync, starts a
# simulated ConfigHub (confighub-sim) and a hub (SQLite) that is its worker
# for every cluster, three simulated clusters (kube-sim) with an agent each
# (dev, staging, prod). The messagewall example (Crossplane-style resources
# with their CRDs, plus a Deployment) is created in ConfigHub and applied to
# dev the way ConfigHub users do (`cub unit set-target`, `cub unit apply
# --wait`), then promoted by unitsync to staging (with an override) and prod
# (after an approval), waiting each time until every cluster reports Ready;
# the hub restarts (as in a rolling update) while the prod promotion waits,
# and the wait carries on.
# It prints what ConfigHub sees, the dashboard's fleet summary (logged in
# over HTTP as an operator would) and unitsync's status matrix. Everything
# runs on 127.0.0.1 and is removed on exit (KEEP=1 keeps it running until
# you press Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building"
cargo build --bins --locked
BIN="$(pwd)/target/debug"
EXAMPLE="$(pwd)/deploy/examples/messagewall"

WORK="$(mktemp -d -t unitsync-quickstart.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # file, what
  for _ in $(seq 1 200); do [ -s "$1" ] && return 0; sleep 0.05; done
  echo "timed out waiting for $2" >&2; exit 1
}

say "starting confighub-sim as ConfigHub"
"$BIN/confighub-sim" serve >"$WORK/confighub.json" 2>"$WORK/confighub.log" &
PIDS+=($!)
wait_for "$WORK/confighub.json" "confighub-sim"
export CONFIGHUB_URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$WORK/confighub.json")
cub() { "$BIN/confighub-sim" cub "$@"; }
SPACE=messagewall-dev
cub space create "$SPACE"
say "cub worker create --space $SPACE actuator-sync"
cub worker create actuator-sync --space "$SPACE" >"$WORK/worker.json"
WORKER_ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["BridgeWorkerID"])' "$WORK/worker.json")
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Secret"], end="")' "$WORK/worker.json" >"$WORK/worker.secret"
chmod 600 "$WORK/worker.secret"

GRPC=$(free_port); HTTP=$(free_port)
export UNITSYNC_HUB="https://127.0.0.1:$GRPC"
export UNITSYNC_DATA_DIR="$WORK/hub"
start_hub() { # the hub on $GRPC/$HTTP with its data in $UNITSYNC_DATA_DIR; HUB_PID
  "$BIN/unitsync" serve --listen "127.0.0.1:$GRPC" --http-listen "127.0.0.1:$HTTP" --data-dir "$UNITSYNC_DATA_DIR" \
    --confighub-url "$CONFIGHUB_URL" --confighub-worker-id "$WORKER_ID" \
    --confighub-worker-secret-file "$WORK/worker.secret" --confighub-environments dev \
    >>"$WORK/hub.log" 2>&1 &
  HUB_PID=$!
  PIDS+=($HUB_PID)
  wait_for "$UNITSYNC_DATA_DIR/admin.token" "the hub"
  for _ in $(seq 1 100); do "$BIN/unitsync" env list >/dev/null 2>&1 && break; sleep 0.1; done
}
start_agent() { # env; AGENT_PID
  "$BIN/unitsync-agent" --hub "$UNITSYNC_HUB" --ca-file "$UNITSYNC_DATA_DIR/ca.crt" --token-file "$WORK/$1.token" \
    --kubeconfig "$WORK/$1.kubeconfig" --state-dir "$WORK/$1-agent" --drift-interval 10 --health-interval-ms 250 \
    >>"$WORK/$1-agent.log" 2>&1 &
  AGENT_PID=$!
  PIDS+=($AGENT_PID)
}
say "starting the hub on $UNITSYNC_HUB as that ConfigHub worker for dev (TLS with its own CA; data in $UNITSYNC_DATA_DIR)"
start_hub

for env in dev staging prod; do
  say "cluster $env-1: kube-sim and its agent"
  "$BIN/kube-sim" --kubeconfig "$WORK/$env.kubeconfig" --name "$env-1" >"$WORK/$env-sim.log" 2>&1 &
  PIDS+=($!)
  wait_for "$WORK/$env.kubeconfig" "kube-sim ($env)"
  gates=()
  # prod is gated from its first moment: one approval.
  if [ "$env" = prod ]; then gates=(--approvals 1); fi
  "$BIN/unitsync" env create "$env" ${gates[@]+"${gates[@]}"}
  "$BIN/unitsync" cluster create "$env-1" --env "$env" -o json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' >"$WORK/$env.token"
  chmod 600 "$WORK/$env.token"
  start_agent "$env"
done
PROD_AGENT=$AGENT_PID
say "environments in promotion order, with their gates"
"$BIN/unitsync" env list

say "ConfigHub shows the hub's target for dev"
for _ in $(seq 1 100); do cub target list --space "$SPACE" | grep -q unitsync-dev && break; sleep 0.1; done
cub target list --space "$SPACE"

UNITS="dynamodb eventbridge iam lambda function-url s3 web"
say "creating the messagewall units in ConfigHub"
for u in crds $UNITS; do
  cub unit create "$u" "$EXAMPLE/$u.yaml" --space "$SPACE" --label app=messagewall
done
say "cub unit set-target unitsync-dev --space $SPACE --unit crds,${UNITS// /,}"
cub unit set-target unitsync-dev --space "$SPACE" --unit "crds,${UNITS// /,}"
say "cub unit apply --space $SPACE --unit crds --wait"
cub unit apply --space "$SPACE" --unit crds --wait
say "cub unit apply --space $SPACE --unit ${UNITS// /,} --wait"
cub unit apply --space "$SPACE" --unit "${UNITS// /,}" --wait

say "what ConfigHub sees: the events of unit web"
cub unit events web --space "$SPACE"

say "staging: 2 replicas of web become 3 (an override kept across promotions)"
"$BIN/unitsync" unit create staging/web --from dev/web
cat >"$WORK/staging-overrides.yaml" <<'YAML'
- kind: Deployment
  name: web
  namespace: messagewall
  path: spec.replicas
  value: 3
YAML
"$BIN/unitsync" unit override staging/web -f "$WORK/staging-overrides.yaml"

say "promoting dev -> staging (gate: every dev cluster Ready)"
"$BIN/unitsync" promote --from dev --to staging --selector app=messagewall --wait --timeout 120

say "promoting staging -> prod (gates: Ready in staging, one approval)"
"$BIN/unitsync" promote --from staging --to prod --all --dry-run >/dev/null 2>&1 || echo "(blocked as expected: prod needs an approval)"
for u in crds $UNITS; do "$BIN/unitsync" approve "staging/$u" --for prod; done
say "with prod's agent away, the promotion's --wait waits; the hub restarts meanwhile (a rolling update)"
kill "$PROD_AGENT"; wait "$PROD_AGENT" 2>/dev/null || true
"$BIN/unitsync" promote --from staging --to prod --all --wait --timeout 120 &
PROMOTING=$!
for _ in $(seq 1 200); do "$BIN/unitsync" unit get prod/web >/dev/null 2>&1 && break; sleep 0.05; done
kill -TERM "$HUB_PID"; wait "$HUB_PID" 2>/dev/null || true
start_hub
start_agent prod
wait "$PROMOTING"

say "the dashboard (http://127.0.0.1:$HTTP/ui/, logged in with admin.token): the fleet page says"
python3 - "$HTTP" "$UNITSYNC_DATA_DIR/admin.token" <<'PY'
import http.cookiejar, re, sys, urllib.parse, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
token = open(sys.argv[2]).read().strip()
web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
form = web.open(base + "/ui/login").read().decode()
csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
login = urllib.parse.urlencode({"token": token, "csrf": csrf, "next": "/ui/"}).encode()
page = web.open(urllib.request.Request(base + "/ui/login", data=login, headers={"Origin": base})).read().decode()
summary = re.search(r'<div class="summary">(.*?)</div>', page, re.S).group(1)
print(" ".join(re.sub(r"<[^>]+>", " ", summary).split()))
PY

say "status"
"$BIN/unitsync" status
say "promotions"
"$BIN/unitsync" promotion list
say "audit (latest)"
"$BIN/unitsync" audit --limit 6

if [ "${KEEP:-}" = "1" ]; then
  say "running; UNITSYNC_HUB=$UNITSYNC_HUB UNITSYNC_DATA_DIR=$UNITSYNC_DATA_DIR; Ctrl-C stops and cleans up"
  echo "dashboard: http://127.0.0.1:$HTTP/ui/ (log in with the token in $UNITSYNC_DATA_DIR/admin.token)"
  wait
fi
say "done: hub, clusters and agents stopped, $WORK removed"
