#!/usr/bin/env bash
# Regenerate docs/prefect-flow-run.png and docs/mlflow-run.png from a real demo run.
#
#   bash docs/take_screenshots.sh        (from the repository root, after `make demo` set up .venv)
#
# Everything runs on 127.0.0.1 in a throw-away temp directory: a Prefect server (with its UI), an
# MLflow tracking server, one `shardwise demo` run against both, then headless Chromium shots of the
# flow-run page and the MLflow run page. Nothing under ~/.prefect or ./.shardwise is read or written,
# and everything started here is stopped on exit. Needs /usr/bin/chromium (Debian: apt-get install chromium);
# pngquant, if present, is used to shrink the PNGs.
#
# Knobs (environment): CHROMIUM (browser binary), ROWS (24), MAX_NEW_TOKENS (16),
# WIDTH/HEIGHT (viewport, 1600x1200), PAGE_TIMEOUT (seconds a page may take to show its data, 90).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
ROWS=${ROWS:-24}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}
WIDTH=${WIDTH:-1600}
HEIGHT=${HEIGHT:-1200}
PAGE_TIMEOUT=${PAGE_TIMEOUT:-90}   # seconds to wait for a page to show its data

log() { printf '[screenshots] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ ! -x $CHROMIUM ]]; then
  die "$CHROMIUM not found. Install Chromium first, e.g. as root: apt-get update && apt-get install -y chromium
             (or point CHROMIUM=/path/to/chromium at another Chromium/Chrome binary)"
fi
for tool in python prefect mlflow shardwise; do
  [[ -x $VENV/bin/$tool ]] || die "$VENV/bin/$tool missing; run 'make demo' (or set up .venv) first"
done
command -v curl >/dev/null || die "curl is needed"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/shardwise-shots.XXXXXX")
PIDS=()
cleanup() {
  local status=$?
  set +e
  for pid in "${PIDS[@]}"; do
    # Each server was started with setsid: its process group id is its pid, so its workers go too.
    kill -TERM -- "-$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null
  done
  if [[ $status -ne 0 ]]; then
    for f in "$TMP"/*.log; do
      [[ -f $f ]] || continue
      log "---- last lines of $(basename "$f") ----"
      tail -n 25 "$f" >&2
    done
  fi
  rm -rf "$TMP"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_http() {  # wait_http URL SECONDS PID NAME
  local url=$1 deadline=$((SECONDS + $2)) pid=$3 name=$4
  until curl -fs -o /dev/null --max-time 5 "$url"; do
    kill -0 "$pid" 2>/dev/null || die "$name exited before answering on $url"
    ((SECONDS < deadline)) || die "$name did not answer on $url within $2 s"
    sleep 1
  done
  log "$name is up: $url"
}

# Isolated state: Prefect home, MLflow store, shardwise state dir, and no user config leaking in.
mkdir -p "$TMP/prefect" "$TMP/state" "$TMP/mlartifacts"
export PREFECT_HOME=$TMP/prefect
export PREFECT_PROFILES_PATH=$TMP/prefect/profiles.toml
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export SHARDWISE_HOME=$TMP/state
unset PREFECT_API_URL PREFECT_API_KEY MLFLOW_TRACKING_URI

# 1. Prefect server with its UI. The UI's API address is fixed when the server starts and comes
# from PREFECT_UI_API_URL / the PREFECT_SERVER_API_* settings, not from --port: without it the UI
# would call http://127.0.0.1:4200/api and show "Can't connect to Server API".
PREFECT_PORT=$(free_port)
log "starting Prefect server on 127.0.0.1:$PREFECT_PORT"
setsid env PREFECT_UI_API_URL="http://127.0.0.1:$PREFECT_PORT/api" \
  "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off \
  >"$TMP/prefect-server.log" 2>&1 </dev/null &
PIDS+=($!)
PREFECT_PID=$!

# 2. MLflow tracking server (the default security middleware already allows 127.0.0.1/localhost).
MLFLOW_PORT=$(free_port)
while [[ $MLFLOW_PORT == "$PREFECT_PORT" ]]; do MLFLOW_PORT=$(free_port); done
log "starting MLflow server on 127.0.0.1:$MLFLOW_PORT"
setsid "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$TMP/mlflow.db" --default-artifact-root "$TMP/mlartifacts" \
  >"$TMP/mlflow-server.log" 2>&1 </dev/null &
PIDS+=($!)
MLFLOW_PID=$!

PREFECT_URL=http://127.0.0.1:$PREFECT_PORT
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
wait_http "$PREFECT_URL/api/health" 180 "$PREFECT_PID" "Prefect server"
wait_http "$MLFLOW_URL/health" 180 "$MLFLOW_PID" "MLflow server"

# 3. The demo, against both servers.
log "running: shardwise demo --rows $ROWS --max-new-tokens $MAX_NEW_TOKENS (a minute or two on CPU)"
PREFECT_API_URL=$PREFECT_URL/api MLFLOW_TRACKING_URI=$MLFLOW_URL \
  "$VENV/bin/shardwise" demo --rows "$ROWS" --max-new-tokens "$MAX_NEW_TOKENS" \
  >"$TMP/demo.out" 2>"$TMP/demo.log" || { cat "$TMP/demo.out" >&2; die "shardwise demo failed"; }
sed -n '/shardwise run summary/,/MLflow run/p' "$TMP/demo.out" >&2

# Ids from the servers' APIs: the newest flow run, and the MLflow run named in the summary.
FLOW_RUN_ID=$(curl -fsS -X POST "$PREFECT_URL/api/flow_runs/filter" -H 'Content-Type: application/json' \
  -d '{"sort": "START_TIME_DESC", "limit": 1}' |
  "$VENV/bin/python" -c 'import json, sys; runs = json.load(sys.stdin); print(runs[0]["id"] if runs else "")')
[[ -n $FLOW_RUN_ID ]] || die "no flow run found on the Prefect server"
MLFLOW_RUN_ID=$(sed -n 's/^MLflow run *\([0-9a-f]\{32\}\) .*/\1/p' "$TMP/demo.out" | head -n 1)
[[ -n $MLFLOW_RUN_ID ]] || die "no MLflow run id in the demo summary"
EXPERIMENT_ID=$(curl -fsS "$MLFLOW_URL/api/2.0/mlflow/runs/get?run_id=$MLFLOW_RUN_ID" |
  "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["run"]["info"]["experiment_id"])')
log "Prefect flow run $FLOW_RUN_ID; MLflow experiment $EXPERIMENT_ID, run $MLFLOW_RUN_ID"

# 4. Screenshots, through the Chrome DevTools protocol (a small Python driver below, using the
# `websockets` package that Prefect already installs) rather than `chromium --screenshot`: it waits
# until the page shows the expected text instead of guessing a virtual-time budget, and it can seed
# localStorage so that MLflow 3 opens in "Model training" mode without its Assistant side panel
# (which otherwise auto-opens on a first visit from 127.0.0.1 and covers a quarter of the page).
cat >"$TMP/shoot.py" <<'PY'
"""Screenshot one page through the Chrome DevTools protocol (headless Chromium).

usage: shoot.py CHROMIUM PROFILE_DIR URL OUT.png WIDTH HEIGHT TIMEOUT_S SETTLE_S [TEXT ...]

Waits until every TEXT appears in the page's visible text, then SETTLE_S more seconds for
canvases/charts to draw, then captures the viewport (WIDTH x HEIGHT).
Before any page script runs, localStorage is seeded from $SHOOT_LOCAL_STORAGE (a JSON object).
"""

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websockets

chromium, profile, url, out, width, height, timeout_s, settle_s, *texts = sys.argv[1:]
width, height, timeout_s, settle_s = int(width), int(height), float(timeout_s), float(settle_s)
local_storage = json.loads(os.environ.get("SHOOT_LOCAL_STORAGE") or "{}")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    f"--user-data-dir={profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
]


async def main() -> None:
    browser = subprocess.Popen([chromium, *FLAGS, "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=open(Path(profile) / "chromium.log", "w"))
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if browser.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"chromium did not start (see {profile}/chromium.log)")
            await asyncio.sleep(0.2)
        port = port_file.read_text().split()[0]
        ws_url = None
        while ws_url is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as resp:
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            if ws_url is None:
                await asyncio.sleep(0.2)
        async with websockets.connect(ws_url, max_size=None) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params):
                msg_id = next(ids)
                await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("id") == msg_id:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})

            await call("Page.enable")
            await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                       deviceScaleFactor=1, mobile=False)
            if local_storage:
                seed = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
                               for k, v in local_storage.items())
                await call("Page.addScriptToEvaluateOnNewDocument", source=f"try {{ {seed} }} catch (e) {{}}")
            await call("Page.navigate", url=url)
            check = ("(() => { const t = document.body ? document.body.innerText : '';"
                     f" return {json.dumps(texts)}.every(s => t.includes(s)); }})()")
            deadline = time.monotonic() + timeout_s
            while True:
                result = await call("Runtime.evaluate", expression=check, returnByValue=True)
                if result.get("result", {}).get("value") is True:
                    break
                if time.monotonic() > deadline:
                    text = await call("Runtime.evaluate", expression="document.body && document.body.innerText",
                                      returnByValue=True)
                    snippet = (text.get("result", {}).get("value") or "")[:400].replace("\n", " | ")
                    raise SystemExit(f"timed out waiting for {texts} on {url}; page text: {snippet}")
                await asyncio.sleep(0.5)
            await asyncio.sleep(settle_s)
            shot = await call("Page.captureScreenshot", format="png")
            Path(out).write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=15)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()


asyncio.run(main())
PY

shoot() {  # shoot URL OUTPUT SETTLE_SECONDS TEXT...
  local url=$1 out=$2 settle=$3 profile
  shift 3
  profile=$(mktemp -d "$TMP/chromium.XXXXXX")
  log "capturing $url -> ${out#"$ROOT"/}"
  timeout 300 "$VENV/bin/python" "$TMP/shoot.py" "$CHROMIUM" "$profile" "$url" "$TMP/shot.png" \
    "$WIDTH" "$HEIGHT" "$PAGE_TIMEOUT" "$settle" "$@" || die "screenshot of $url failed"
  if command -v pngquant >/dev/null; then
    pngquant --force --quality=70-95 --speed 1 --output "$out" -- "$TMP/shot.png" || cp "$TMP/shot.png" "$out"
  else
    cp "$TMP/shot.png" "$out"
  fi
  rm -f "$TMP/shot.png"
  log "wrote ${out#"$ROOT"/} ($(($(stat -c %s "$out") / 1024)) KB)"
}

# The run graph is a canvas (no text to wait for): give it a few seconds after the logs show up.
shoot "$PREFECT_URL/runs/flow-run/$FLOW_RUN_ID" "$ROOT/docs/prefect-flow-run.png" 4 \
  "Completed" "Task Runs" "Finished in state"
SHOOT_LOCAL_STORAGE='{"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": true, "mlflow.assistant.panelOpen_v1": false, "mlflow.workflowType_v1": "machine_learning"}' \
  shoot "$MLFLOW_URL/#/experiments/$EXPERIMENT_ID/runs/$MLFLOW_RUN_ID?workflowType=machine_learning" \
  "$ROOT/docs/mlflow-run.png" 3 "$MLFLOW_RUN_ID" "Metrics (" "Parameters (" "rows_per_s"

log "done; stopping the servers"
