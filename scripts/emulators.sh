#!/usr/bin/env bash
# Local AWS emulators for Sluice's tests: kinesis-local (Kinesis) and moto server (S3, DynamoDB).
#
# Used two ways:
#   * as a library:  source scripts/emulators.sh; emu_install; emu_start; ...; emu_stop
#   * as a CLI:      scripts/emulators.sh install   # install (or check) the pinned emulators
#                    scripts/emulators.sh run CMD... # same as scripts/with-emulators CMD...
#
# The status-page browser test also needs headless Chromium: emu_install installs Debian's
# `chromium` package (apt-get, as root or through sudo) when /usr/bin/chromium is missing, and
# fails loudly if it cannot; emu_export_env passes its path to the tests as SLUICE_CHROMIUM (set
# SLUICE_CHROMIUM yourself to use another Chromium build).
#
# Everything lives in the git-ignored folder .emulators/ at the repo root (override with
# SLUICE_EMULATORS_DIR, e.g. to share one install between several clones):
#   .emulators/node/   npm prefix holding kinesis-local
#   .emulators/venv/   Python venv holding moto[server]
#   .emulators/logs/   install logs and one log per started emulator (<name>-<port>.log)
#
# Processes: emu_start records the PIDs it starts in EMU_PIDS; emu_stop stops exactly those PIDs
# and their descendants (TERM, then KILL after EMU_STOP_TIMEOUT seconds). Nothing is ever killed by
# name. emu_with installs EXIT/INT/TERM/HUP traps so the emulators are stopped in every case; as a
# last resort each emulator also gets SIGTERM from the kernel if the shell that started it dies
# (setpriv --pdeathsig), so even a SIGKILLed wrapper does not leave emulators behind.
# emu_start must run in the long-lived shell itself, never inside $(...) or a pipeline subshell.

# ---- pinned versions (see shared/reference/emulators.md) --------------------------------------
EMU_KINESIS_LOCAL_VERSION=0.6.2
EMU_MOTO_VERSION=5.2.5
# Every transitive dependency of moto[server] is pinned too, so a new release of one cannot break CI.
EMU_MOTO_CONSTRAINTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/moto-constraints.txt"
EMU_BUCKET=sluice-test
EMU_REGION=us-east-1

# ---- knobs --------------------------------------------------------------------------------------
: "${EMU_READY_TIMEOUT:=60}"    # seconds to wait for an emulator to answer its readiness probe
: "${EMU_STOP_TIMEOUT:=10}"     # seconds between TERM and KILL when stopping
: "${EMU_START_ATTEMPTS:=3}"    # retries with fresh ports if an emulator dies while starting
: "${EMU_INSTALL_TIMEOUT:=900}" # seconds to wait for another process's install lock
: "${EMU_KEEP_LOGS:=40}"        # per-run emulator logs kept in .emulators/logs/

EMU_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMU_HOME="${SLUICE_EMULATORS_DIR:-$EMU_ROOT/.emulators}"
EMU_NODE_PREFIX="$EMU_HOME/node"
EMU_KINESIS_DIR="$EMU_NODE_PREFIX/node_modules/kinesis-local"
EMU_VENV="$EMU_HOME/venv"
EMU_LOG_DIR="$EMU_HOME/logs"
EMU_CHROMIUM="${SLUICE_CHROMIUM:-/usr/bin/chromium}"

EMU_PIDS=()          # PIDs started by emu_start in this shell
EMU_KINESIS_PORT=""  # plain-HTTP port of kinesis-local
EMU_KINESIS_TLS_PORT=""
EMU_MOTO_PORT=""
EMU_CHILD=""         # PID of the command emu_with runs, while it runs

emu_log() { printf '[emulators] %s\n' "$*" >&2; }
emu_err() { emu_log "ERROR: $*"; } # logs only; callers return non-zero themselves

# ---- install -----------------------------------------------------------------------------------

# emu_stamp_ok STAMP_FILE EXPECTED: true if the stamp file holds exactly EXPECTED.
emu_stamp_ok() { [[ -f $1 && "$(<"$1")" == "$2" ]]; }

emu_kinesis_stamp() { echo "kinesis-local@$EMU_KINESIS_LOCAL_VERSION node=$(node --version)"; }
emu_moto_stamp() {
    # The venv links to the interpreter it was made with: a different python3 means a new venv.
    echo "moto[server]==$EMU_MOTO_VERSION constraints=$(cksum <"$EMU_MOTO_CONSTRAINTS" | cut -d' ' -f1) python=$(python3 -c 'import sys; print(sys.base_prefix, sys.version.split()[0])')"
}

emu_kinesis_installed() {
    emu_stamp_ok "$EMU_NODE_PREFIX/.stamp" "$(emu_kinesis_stamp)" &&
        [[ -f $EMU_KINESIS_DIR/main.js && -f $EMU_KINESIS_DIR/server.json ]]
}
emu_moto_installed() {
    emu_stamp_ok "$EMU_VENV/.stamp" "$(emu_moto_stamp)" && [[ -x $EMU_VENV/bin/moto_server ]]
}

emu_install_kinesis() {
    local log="$EMU_LOG_DIR/install-kinesis-local.log"
    emu_log "installing kinesis-local@$EMU_KINESIS_LOCAL_VERSION from npm into $EMU_NODE_PREFIX"
    rm -rf "$EMU_NODE_PREFIX"
    mkdir -p "$EMU_NODE_PREFIX"
    if ! npm install --prefix "$EMU_NODE_PREFIX" --no-audit --no-fund --loglevel=error \
        "kinesis-local@$EMU_KINESIS_LOCAL_VERSION" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        emu_err "npm install of kinesis-local failed (full log: $log)"
        return 1
    fi
    [[ -f $EMU_KINESIS_DIR/main.js && -f $EMU_KINESIS_DIR/server.json ]] ||
        { emu_err "kinesis-local installed but main.js/server.json are missing in $EMU_KINESIS_DIR"; return 1; }
    emu_kinesis_stamp >"$EMU_NODE_PREFIX/.stamp"
}

emu_install_moto() {
    local log="$EMU_LOG_DIR/install-moto.log"
    emu_log "installing moto[server]==$EMU_MOTO_VERSION from PyPI into $EMU_VENV"
    rm -rf "$EMU_VENV"
    if ! { python3 -m venv "$EMU_VENV" &&
        "$EMU_VENV/bin/pip" install --disable-pip-version-check --no-input -q \
            -c "$EMU_MOTO_CONSTRAINTS" "moto[server]==$EMU_MOTO_VERSION"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        emu_err "pip install of moto[server] failed (full log: $log)"
        return 1
    fi
    [[ -x $EMU_VENV/bin/moto_server ]] || { emu_err "moto installed but $EMU_VENV/bin/moto_server is missing"; return 1; }
    emu_moto_stamp >"$EMU_VENV/.stamp"
}

# emu_install_chromium: Debian's chromium for the status-page browser test, when missing.
emu_install_chromium() {
    local log="$EMU_LOG_DIR/install-chromium.log" sudo=()
    [[ -x $EMU_CHROMIUM ]] && return 0
    if [[ -n ${SLUICE_CHROMIUM:-} ]]; then
        emu_err "SLUICE_CHROMIUM=$SLUICE_CHROMIUM is not an executable"
        return 1
    fi
    command -v apt-get >/dev/null ||
        { emu_err "$EMU_CHROMIUM is missing and apt-get is not available: install Chromium and set SLUICE_CHROMIUM to its path"; return 1; }
    if ((EUID != 0)); then
        command -v sudo >/dev/null ||
            { emu_err "$EMU_CHROMIUM is missing: run 'apt-get install -y chromium' as root (or set SLUICE_CHROMIUM)"; return 1; }
        sudo=(sudo -n)
    fi
    mkdir -p "$EMU_LOG_DIR"
    emu_log "installing Debian's chromium (apt-get) for the status-page browser test"
    # A stale package list is refreshed once before giving up.
    # apt's own lock serialises concurrent runs (waiting up to 10 minutes for another apt-get).
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
    if ! { "${apt[@]}" install -y --no-install-recommends chromium ||
        { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends chromium; }; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        emu_err "apt-get install chromium failed (full log: $log); install it or set SLUICE_CHROMIUM to a Chromium binary"
        return 1
    fi
    [[ -x $EMU_CHROMIUM ]] || { emu_err "chromium installed but $EMU_CHROMIUM is missing"; return 1; }
}

# emu_install: install whatever is missing or stale (both emulators in parallel, and Chromium); a
# no-op when up to date. Serialised with a lock so two concurrent runs do not install over each
# other.
emu_install() {
    local need_k=0 need_m=0 pid_k="" pid_m="" rc=0 start=$SECONDS
    emu_install_chromium || return 1
    emu_kinesis_installed || need_k=1
    emu_moto_installed || need_m=1
    ((need_k || need_m)) || return 0
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then emu_err "node and npm are needed"; return 1; fi
    command -v python3 >/dev/null || { emu_err "python3 is needed"; return 1; }
    mkdir -p "$EMU_HOME" "$EMU_LOG_DIR"
    (
        flock -w "$EMU_INSTALL_TIMEOUT" 9 || { emu_err "timed out waiting for $EMU_HOME/.install.lock"; exit 1; }
        # Re-check under the lock: another run may have just installed.
        if ! emu_kinesis_installed; then emu_install_kinesis & pid_k=$!; fi
        if ! emu_moto_installed; then emu_install_moto & pid_m=$!; fi
        if [[ -n $pid_k ]]; then wait "$pid_k" || rc=1; fi
        if [[ -n $pid_m ]]; then wait "$pid_m" || rc=1; fi
        exit "$rc"
    ) 9>"$EMU_HOME/.install.lock" || return 1
    emu_log "emulators installed in $((SECONDS - start)) s"
}

# ---- processes ---------------------------------------------------------------------------------

# emu_free_ports N: print N distinct currently-free TCP ports (free on all interfaces, because
# kinesis-local listens on every interface whatever we ask).
emu_free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

# emu_alive PID: true while PID exists and is not a zombie.
emu_alive() {
    local stat
    [[ -r /proc/$1/stat ]] || return 1
    # The process may exit between the test and the read: no message then.
    stat=$({ cat "/proc/$1/stat"; } 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# emu_descendants PID: print all descendant PIDs of PID (children first-level, then deeper).
emu_descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        emu_descendants "$child"
    done
}

# emu_spawn NAME LOG CMD...: start CMD in the background in this shell, record its PID.
# setpriv --pdeathsig: the kernel sends SIGTERM to the emulator if this shell dies.
emu_spawn() {
    local name=$1 log=$2
    shift 2
    setpriv --pdeathsig TERM -- "$@" </dev/null >"$log" 2>&1 &
    EMU_PIDS+=("$!")
    emu_log "started $name (pid $!, log ${log#"$EMU_ROOT"/})"
}

# emu_wait_ready NAME PID URL LOG: poll URL until it answers 2xx; fail if PID dies or on timeout.
emu_wait_ready() {
    local name=$1 pid=$2 url=$3 log=$4 deadline=$((SECONDS + EMU_READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        if curl -fsS --noproxy '*' --max-time 2 -o /dev/null "$url" 2>/dev/null; then
            return 0
        fi
        if ! emu_alive "$pid"; then
            emu_log "$name (pid $pid) exited before becoming ready; last lines of $log:"
            tail -n 40 "$log" >&2
            return 2
        fi
        sleep 0.2
    done
    emu_log "$name (pid $pid) not ready at $url after ${EMU_READY_TIMEOUT}s; last lines of $log:"
    tail -n 40 "$log" >&2
    return 1
}

# emu_stop_pids PID...: stop exactly these processes and their descendants.
emu_stop_pids() {
    local p all=() deadline
    for p in "$@"; do
        all+=("$p")
        # shellcheck disable=SC2207 # PIDs are plain integers
        all+=($(emu_descendants "$p"))
    done
    ((${#all[@]})) || return 0
    kill -TERM "${all[@]}" 2>/dev/null || true
    deadline=$((SECONDS + EMU_STOP_TIMEOUT))
    for p in "${all[@]}"; do
        while emu_alive "$p" && ((SECONDS < deadline)); do sleep 0.1; done
        if emu_alive "$p"; then
            emu_log "pid $p ignored SIGTERM for ${EMU_STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    # Reap our direct children (silences bash's "Terminated" job notices).
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

# emu_start_kinesis: start kinesis-local on free ports and wait until /healthcheck answers.
emu_start_kinesis() {
    local attempt ports kport tport log pid rc
    for ((attempt = 1; attempt <= EMU_START_ATTEMPTS; attempt++)); do
        ports=$(emu_free_ports 2) || return 1
        read -r kport tport <<<"$ports"
        log="$EMU_LOG_DIR/kinesis-local-$kport.log"
        emu_spawn kinesis-local "$log" env \
            AWS_REGION="$EMU_REGION" \
            KINESIS_MOCK_CERT_PATH="$EMU_KINESIS_DIR/server.json" \
            KINESIS_MOCK_PLAIN_PORT="$kport" KINESIS_MOCK_TLS_PORT="$tport" \
            CREATE_STREAM_DURATION=0ms DELETE_STREAM_DURATION=0ms \
            SPLIT_SHARD_DURATION=0ms MERGE_SHARDS_DURATION=0ms \
            UPDATE_SHARD_COUNT_DURATION=0ms UPDATE_STREAM_MODE_DURATION=0ms \
            REGISTER_STREAM_CONSUMER_DURATION=0ms DEREGISTER_STREAM_CONSUMER_DURATION=0ms \
            START_STREAM_ENCRYPTION_DURATION=0ms STOP_STREAM_ENCRYPTION_DURATION=0ms \
            AWS_ACCOUNT_ID=000000000000 SHOULD_PERSIST_DATA=false \
            SHARD_LIMIT=1000 LOG_LEVEL=WARN \
            node "$EMU_KINESIS_DIR/main.js"
        pid=${EMU_PIDS[-1]}
        rc=0
        emu_wait_ready kinesis-local "$pid" "http://127.0.0.1:$kport/healthcheck" "$log" || rc=$?
        if ((rc == 0)); then
            EMU_KINESIS_PORT=$kport EMU_KINESIS_TLS_PORT=$tport
            return 0
        fi
        emu_stop_pids "$pid"
        unset 'EMU_PIDS[-1]'
        ((rc == 2)) || break # only retry (fresh ports) if it died, e.g. a port was taken meanwhile
    done
    emu_err "kinesis-local did not start"
    return 1
}

# emu_start_moto: start moto server on a free loopback port, wait for /moto-api/, make the bucket.
emu_start_moto() {
    local attempt mport log pid rc
    for ((attempt = 1; attempt <= EMU_START_ATTEMPTS; attempt++)); do
        mport=$(emu_free_ports 1) || return 1
        log="$EMU_LOG_DIR/moto-$mport.log"
        emu_spawn moto "$log" env AWS_REGION="$EMU_REGION" \
            "$EMU_VENV/bin/moto_server" -H 127.0.0.1 -p "$mport"
        pid=${EMU_PIDS[-1]}
        rc=0
        emu_wait_ready moto "$pid" "http://127.0.0.1:$mport/moto-api/" "$log" || rc=$?
        if ((rc == 0)); then
            EMU_MOTO_PORT=$mport
            break
        fi
        emu_stop_pids "$pid"
        unset 'EMU_PIDS[-1]'
        ((rc == 2)) || break
    done
    [[ -n $EMU_MOTO_PORT ]] || { emu_err "moto server did not start"; return 1; }
    # Buckets on moto are created with a plain unsigned PUT.
    curl -fsS --noproxy '*' --max-time 10 -o /dev/null -X PUT "http://127.0.0.1:$EMU_MOTO_PORT/$EMU_BUCKET" ||
        { emu_err "could not create bucket $EMU_BUCKET on moto"; return 1; }
}

# emu_prune_logs: keep the newest EMU_KEEP_LOGS per-run emulator logs (names are <name>-<port>.log).
emu_prune_logs() {
    local f
    # shellcheck disable=SC2012 # our own file names: no spaces or newlines
    ls -t "$EMU_LOG_DIR"/*-[0-9]*.log 2>/dev/null | tail -n +"$((EMU_KEEP_LOGS + 1))" |
        while read -r f; do rm -f "$f"; done
}

# emu_start: start both emulators (install first if needed). Sets EMU_KINESIS_PORT, EMU_MOTO_PORT.
# On failure, stops whatever it started and returns non-zero.
emu_start() {
    local start=$SECONDS
    command -v setpriv >/dev/null || { emu_err "setpriv (util-linux) is needed"; return 1; }
    command -v curl >/dev/null || { emu_err "curl is needed"; return 1; }
    emu_install || return 1
    mkdir -p "$EMU_LOG_DIR"
    emu_prune_logs
    if ! emu_start_kinesis || ! emu_start_moto; then
        emu_stop
        return 1
    fi
    emu_log "ready in $((SECONDS - start)) s: kinesis-local on 127.0.0.1:$EMU_KINESIS_PORT (tls $EMU_KINESIS_TLS_PORT), moto on 127.0.0.1:$EMU_MOTO_PORT (bucket $EMU_BUCKET)"
}

# emu_stop: stop every process emu_start started in this shell (and their children). Idempotent.
emu_stop() {
    ((${#EMU_PIDS[@]})) || return 0
    emu_log "stopping emulators (pids ${EMU_PIDS[*]})"
    emu_stop_pids "${EMU_PIDS[@]}"
    EMU_PIDS=()
}

# emu_export_env: export the environment the tests read.
emu_export_env() {
    # Keep a developer's real AWS settings out of the tests.
    unset AWS_SESSION_TOKEN AWS_PROFILE AWS_DEFAULT_PROFILE AWS_ENDPOINT_URL \
        AWS_ENDPOINT_URL_KINESIS AWS_ENDPOINT_URL_DYNAMODB AWS_ENDPOINT_URL_S3
    export SLUICE_KINESIS_ENDPOINT="http://127.0.0.1:$EMU_KINESIS_PORT"
    export SLUICE_MOTO_ENDPOINT="http://127.0.0.1:$EMU_MOTO_PORT"
    # The names the Kinesis examples read (`--kinesis-endpoint` / `--dynamodb-endpoint` defaults).
    export SLUICE_DYNAMODB_ENDPOINT="$SLUICE_MOTO_ENDPOINT"
    export SLUICE_TEST_S3_BUCKET="$EMU_BUCKET"
    export AWS_REGION="$EMU_REGION"
    export AWS_ACCESS_KEY_ID=test
    export AWS_SECRET_ACCESS_KEY=test
    export AWS_ALLOW_HTTP=true
    export SLUICE_CHROMIUM="$EMU_CHROMIUM" # headless Chromium for the status-page browser test
    export SLUICE_EMULATORS_RUNNING=1 # lets nested scripts (scripts/test --tests-only) reuse these
}

# emu_on_signal CODE: stop the command (if running) and the emulators, then exit with CODE.
emu_on_signal() {
    local code=$1
    trap - EXIT INT TERM HUP
    if [[ -n ${EMU_CHILD:-} ]]; then
        emu_log "signal received: stopping the command (pid $EMU_CHILD)"
        emu_stop_pids "$EMU_CHILD"
    fi
    emu_stop
    exit "$code"
}

# emu_with CMD...: install + start the emulators, export the env, run CMD (an executable, not a
# shell function), stop the emulators in every case and return CMD's exit status. Installs traps;
# meant for a script's top level.
#
# CMD runs as a background job that keeps this shell's stdin and default SIGINT/SIGQUIT handling
# (bash would otherwise ignore them for background jobs), so that:
#   * Ctrl-C reaches CMD exactly as it would in the foreground; when CMD ends we clean up;
#   * SIGTERM/SIGHUP sent to this wrapper alone is acted on at once (bash defers traps while a
#     foreground command runs): CMD and its children get SIGTERM, then the emulators are stopped.
emu_with() {
    (($#)) || { emu_err "usage: with-emulators COMMAND [ARGS...]"; return 2; }
    EMU_CHILD=""
    trap 'emu_stop' EXIT
    trap 'emu_on_signal 130' INT
    trap 'emu_on_signal 143' TERM
    trap 'emu_on_signal 129' HUP
    emu_start || return 1
    emu_export_env
    local rc=0
    trap ':' INT # CMD gets Ctrl-C itself (same process group); we keep waiting for it to end
    if { true 3<&0; } 2>/dev/null; then # fd 0 is open
        env --default-signal=INT,QUIT "$@" <&0 &
    else # no stdin at all (closed fd 0)
        env --default-signal=INT,QUIT "$@" </dev/null &
    fi
    EMU_CHILD=$!
    while :; do
        rc=0
        wait "$EMU_CHILD" || rc=$?
        # wait also returns when a trapped signal arrives: go on waiting while CMD still exists.
        kill -0 "$EMU_CHILD" 2>/dev/null || break
    done
    EMU_CHILD=""
    emu_stop
    trap - EXIT INT TERM HUP
    return "$rc"
}

# ---- CLI ---------------------------------------------------------------------------------------
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        install) emu_install ;;
        run) shift; emu_with "$@" ;;
        *)
            echo "usage: $0 install | run COMMAND [ARGS...]" >&2
            exit 2
            ;;
    esac
fi
