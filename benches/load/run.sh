#!/usr/bin/env bash
# Load test: requests per second per core, sluice vs nginx, haproxy and Caddy vs the backend alone; the cost
# of each built-in strategy; latency at a fixed request rate; and 2 and 4 workers where the machine has the CPUs.
#
#   benches/load/run.sh                      # build sluice (release profile) if needed, measure, print the tables
#   DURATION=20 RUNS=3 benches/load/run.sh   # longer runs, 3 rounds; the tables show the median
#   STRATEGIES=1 benches/load/run.sh         # also every built-in strategy over 64 backends
#   SLUICE_BIN=path DURATION=2 WARMUP=1 LAT_DURATION=2 benches/load/run.sh   # quick smoke run of a given binary
#
# Everything runs on 127.0.0.1. The proxy under test is pinned to CPU $PROXY_CPU, wrk and the backend
# to CPU $LOAD_CPU (taskset), so "requests/s" is the throughput of one proxy core. Every process this
# script starts is killed on exit.
#
# What is measured (all throughput targets are interleaved within each round, with a warm-up before each):
#   1. throughput (wrk, closed loop, CONNS keep-alive connections) of each target in TARGETS:
#        direct         wrk -> backend, no proxy (the ceiling of the load side)
#        nginx          nginx, 1 worker, upstream keepalive
#        sluice         sluice, threads = 1, strategy builtin:round-robin (Wasm), lean HTTP/1 path
#        sluice-pingora the same on pingora-proxy's HTTP/1 path ([server] http1 = "pingora")
#        sluice-native  sluice, threads = 1, strategy native:round-robin (no Wasm); skipped with a message
#                       when the binary refuses that config
#        haproxy        haproxy, nbthread 1, http-reuse always (skipped if it cannot be installed)
#        caddy          Caddy (Debian package), GOMAXPROCS=1, reverse_proxy with upstream keep-alive
#                       (skipped if it cannot be installed)
#      Each row shows req/s, req/CPU-s (requests per second of CPU time used by the proxy process, from the
#      utime+stime deltas in /proc/PID/stat over the measured window) and both as ratios to nginx.
#   2. STRATEGIES=1: every built-in strategy of the binary (the list is read from the binary itself) plus
#      native:round-robin, each in its own sluice (threads = 1) over STRAT_BACKENDS backends (64 listening
#      ports of one nginx process), relative to builtin:round-robin measured in the same rounds. wrk requests
#      GET /k/0 ... /k/999 in turn (a Lua script); ring-hash and maglev hash on the path (key = "path").
#   3. LATENCY=1: p50/p90/p99/max at a fixed offered rate (RATE req/s for LAT_DURATION s) of every target in
#      TARGETS, with oha (installed with `cargo install --locked` if it is not there). oha -q sends on a fixed
#      schedule, and --latency-correction measures each request from the time it was scheduled to go out,
#      not from when a connection was free, so a stall is charged to every request it delayed (no
#      coordinated omission, unlike wrk's latency figures, which are closed loop).
#   4. On machines with more than 2 CPUs: nginx (worker_processes N) and sluice (threads = N) for each N in
#      WORKERS, pinned to CPUs 0..N-1, with wrk and a backend (nginx, up to 4 workers) on the other CPUs. A
#      value of N is skipped if fewer than N+1 CPUs exist. On 2-CPU machines the table says it was skipped.
#
# Knobs (environment):
#   DURATION=10    seconds per measurement (wrk -d)        WARMUP=2   seconds of load before each measurement
#   CONNS=64       wrk connections (wrk -c)                RUNS=1     rounds; targets are interleaved per round
#   PROXY_CPU=0    CPU for the proxy under test            LOAD_CPU=1 CPU for wrk, oha and the backend
#   BASE_PORT=18080  ports BASE_PORT+1 .. BASE_PORT+200 are used (backends, proxies, admin ports)
#   TARGETS="direct nginx sluice sluice-pingora sluice-native haproxy caddy"   which to measure
#   STRATEGIES=0     1: also measure every built-in strategy (section 2)
#   STRAT_BACKENDS=64  backends in the strategy pool (1..64)
#   STRATEGY_LIST=   strategies to measure instead of all, e.g. "round-robin maglev native:round-robin"
#                    (a bare name means builtin:NAME)
#   LATENCY=1        0: skip the fixed-rate latency section
#   RATE=5000        offered req/s for the latency section; keep it well below the slowest target's req/s
#   LAT_DURATION=10  seconds per latency measurement       LAT_CONNS=$CONNS  oha connections (oha -c)
#   OHA_BIN=path     use this oha; otherwise oha from PATH, else target/loadtest/tools/bin/oha, else
#                    `cargo install --locked --root target/loadtest/tools oha --version $OHA_VERSION`
#   OHA_VERSION=1.16.0  the oha version to install (empty: the newest)
#   WORKERS="2 4"    worker counts for section 4 (empty: skip it)
#   SLUICE_BIN=path  use this sluice binary, do not build
#   SLUICE_REV=rev   build sluice from a `git archive` snapshot of commit `rev` (into target/loadtest/) instead
#                    of the working tree, e.g. when the working tree does not build right now
#   KEEP_TMP=1       keep the temp dir (configs, logs, raw wrk and oha output)
#   PERF_OUT=dir     after the measurements, run one extra (uncounted) sluice round under
#                    `perf record -e cpu-clock --call-graph dwarf` and write perf.data + perf-report.txt to dir
#                    (cpu-clock is a software timer, so it works in VMs without hardware counters)
set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
RUNS=${RUNS:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_PORT=${BASE_PORT:-18080}
TARGETS=${TARGETS:-direct nginx sluice sluice-pingora sluice-native haproxy caddy}
STRATEGIES=${STRATEGIES:-0}
STRAT_BACKENDS=${STRAT_BACKENDS:-64}
STRATEGY_LIST=${STRATEGY_LIST:-}
LATENCY=${LATENCY:-1}
RATE=${RATE:-5000}
LAT_DURATION=${LAT_DURATION:-10}
LAT_CONNS=${LAT_CONNS:-$CONNS}
OHA_BIN=${OHA_BIN:-}
OHA_VERSION=${OHA_VERSION-1.16.0}
WORKERS=${WORKERS-2 4}
SLUICE_BIN=${SLUICE_BIN:-}
SLUICE_REV=${SLUICE_REV:-}
KEEP_TMP=${KEEP_TMP:-0}
PERF_OUT=${PERF_OUT:-}

# Port map (offsets from BASE_PORT): 1-11 the single-core targets, 20-99 the strategy proxies (2 each),
# 100-163 the strategy backends, 170-199 the multi-worker set (10 per worker count).
BACKEND_PORT=$((BASE_PORT + 1))
NGINX_PORT=$((BASE_PORT + 2))
SLUICE_PORT=$((BASE_PORT + 3))
SLUICE_ADMIN_PORT=$((BASE_PORT + 4))
HAPROXY_PORT=$((BASE_PORT + 5))
CADDY_PORT=$((BASE_PORT + 6))
NATIVE_PORT=$((BASE_PORT + 7))
NATIVE_ADMIN_PORT=$((BASE_PORT + 8))
PINGORA_PORT=$((BASE_PORT + 10))
PINGORA_ADMIN_PORT=$((BASE_PORT + 11))
STRAT_PROXY_BASE=$((BASE_PORT + 20))
STRAT_BACKEND_BASE=$((BASE_PORT + 100))
SCALE_BASE=$((BASE_PORT + 170))

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] error: %s\n' "$*" >&2; exit 1; }

for v in DURATION WARMUP CONNS RUNS PROXY_CPU LOAD_CPU BASE_PORT STRATEGIES STRAT_BACKENDS LATENCY RATE LAT_DURATION LAT_CONNS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
((DURATION >= 1 && DURATION <= 600)) || die "DURATION must be 1..600 seconds"
((WARMUP <= 600)) || die "WARMUP must be 0..600 seconds"
((RUNS >= 1 && RUNS <= 20)) || die "RUNS must be 1..20"
((CONNS >= 1 && CONNS <= 10000)) || die "CONNS must be 1..10000"
((BASE_PORT >= 1024 && BASE_PORT + 200 <= 65535)) || die "BASE_PORT must be 1024..65335"
((STRATEGIES <= 1)) || die "STRATEGIES must be 0 or 1"
((STRAT_BACKENDS >= 1 && STRAT_BACKENDS <= 64)) || die "STRAT_BACKENDS must be 1..64"
((LATENCY <= 1)) || die "LATENCY must be 0 or 1"
((RATE >= 1 && RATE <= 1000000)) || die "RATE must be 1..1000000 req/s"
((LAT_DURATION >= 1 && LAT_DURATION <= 600)) || die "LAT_DURATION must be 1..600 seconds"
((LAT_CONNS >= 1 && LAT_CONNS <= 10000)) || die "LAT_CONNS must be 1..10000"
n_workers=0
for n in $WORKERS; do
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 2 || n > 64)); then die "WORKERS must list worker counts 2..64 (got '$n')"; fi
    n_workers=$((n_workers + 1))
done
((n_workers <= 3)) || die "WORKERS may list at most 3 worker counts"
for t in $TARGETS; do
    case $t in
    direct | nginx | sluice | sluice-pingora | sluice-native | haproxy | caddy) ;;
    *) die "unknown target '$t' (known: direct nginx sluice sluice-pingora sluice-native haproxy caddy)" ;;
    esac
done
for s in $STRATEGY_LIST; do
    [[ $s =~ ^(builtin:|native:)?[a-z0-9-]+$ ]] || die "STRATEGY_LIST: '$s' is not a strategy name"
done
wants() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- temp dir and clean-up
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-load.XXXXXX")
PIDS=()
declare -A PID
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- dependencies
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
APT_UPDATED=0
apt_install() {
    if ((APT_UPDATED == 0)); then
        "${SUDO[@]}" apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    # policy-rc.d is not touched: installing nginx/haproxy/caddy may try to start the system service; we
    # never use it (ours run from a temp prefix on our own ports).
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]]; }
need() { # need COMMAND PACKAGE
    have "$1" && return 0
    log "installing $2"
    apt_install "$2" || die "cannot install $2 (apt-get install $2)"
}
optional() { # optional COMMAND PACKAGE: 0 if COMMAND is there or could be installed
    have "$1" && return 0
    log "installing $2 (optional)"
    apt_install "$2" 2>/dev/null && return 0
    log "$2 is not installable (apt-get install $2 failed); skipping it"
    return 1
}
need wrk wrk
need nginx nginx
need curl curl
need taskset util-linux
[[ -z $PERF_OUT ]] || need perf linux-perf
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

SKIPPED=() # reasons, printed under the tables
HAVE_HAPROXY=0
if wants haproxy; then
    if optional haproxy haproxy; then HAVE_HAPROXY=1; else SKIPPED+=("haproxy: the Debian package could not be installed"); fi
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
HAVE_CADDY=0
if wants caddy; then
    if optional caddy caddy; then HAVE_CADDY=1; else SKIPPED+=("caddy: the Debian package could not be installed"); fi
fi
CADDY=$(command -v caddy || echo /usr/bin/caddy)

# oha for the fixed-rate latency section (a Rust tool from crates.io; its JSON is read with jq)
OHA=""
if ((LATENCY)); then
    need jq jq
    if [[ -n $OHA_BIN ]]; then
        [[ -x $OHA_BIN ]] || die "OHA_BIN=$OHA_BIN is not an executable"
        OHA=$OHA_BIN
    elif command -v oha >/dev/null 2>&1; then
        OHA=$(command -v oha)
    elif [[ -x $REPO/target/loadtest/tools/bin/oha ]]; then
        OHA=$REPO/target/loadtest/tools/bin/oha
    elif command -v cargo >/dev/null 2>&1; then
        log "installing oha${OHA_VERSION:+ $OHA_VERSION}: cargo install --locked --root target/loadtest/tools oha (a few minutes, once)"
        # CARGO_TARGET_DIR is dropped so that this build never locks or touches the workspace's target dir.
        if env -u CARGO_TARGET_DIR timeout 1800 cargo install --locked --root "$REPO/target/loadtest/tools" oha \
            ${OHA_VERSION:+--version "$OHA_VERSION"} >"$TMP/oha-install.log" 2>&1; then
            OHA=$REPO/target/loadtest/tools/bin/oha
        else
            log "cannot install oha: $(tail -2 "$TMP/oha-install.log" | tr '\n' ' ')"
        fi
    fi
    if [[ -z $OHA ]]; then
        SKIPPED+=("latency: no oha (set OHA_BIN, put oha on PATH, or install cargo so the script can install it)")
    fi
fi

NCPU=$(nproc)
((PROXY_CPU < NCPU && LOAD_CPU < NCPU)) || die "PROXY_CPU=$PROXY_CPU / LOAD_CPU=$LOAD_CPU: this machine has $NCPU CPUs"
((PROXY_CPU != LOAD_CPU)) || log "warning: the proxy and the load generator share CPU $PROXY_CPU"

# ---------------------------------------------------------------- sluice binary
if [[ -z $SLUICE_BIN ]]; then
    if [[ -n $SLUICE_REV ]]; then
        rev=$(git -C "$REPO" rev-parse --short=12 "$SLUICE_REV^{commit}") || die "SLUICE_REV=$SLUICE_REV is not a commit"
        src=$REPO/target/loadtest/src-$rev
        if [[ ! -f $src/Cargo.toml ]]; then
            log "exporting commit $rev to $src"
            rm -rf "$src.partial" && mkdir -p "$src.partial"
            git -C "$REPO" archive "$rev" | tar -x -C "$src.partial"
            mv "$src.partial" "$src"
        fi
        # Older commits shipped their fast build as the `perf` profile; newer ones as `release`.
        profile=release; grep -q '^\[profile.perf\]' "$src/Cargo.toml" && profile=perf
        log "building sluice at $rev: cargo build --profile $profile -p sluice (fat LTO; 10+ minutes cold)"
        (cd "$src" && CARGO_TARGET_DIR=$REPO/target/loadtest/target cargo build --profile "$profile" -p sluice)
        SLUICE_BIN=$REPO/target/loadtest/target/$profile/sluice
        SLUICE_DESC="commit $rev ($profile profile)"
    else
        log "building sluice: cargo build --release -p sluice (fat LTO; 10+ minutes cold)"
        (cd "$REPO" && cargo build --release -p sluice) ||
            die "build failed; if the working tree is mid-change, try SLUICE_REV=HEAD (or an older commit)"
        SLUICE_BIN=$REPO/target/release/sluice
        dirty=$(git -C "$REPO" status --porcelain -- proxy Cargo.lock 2>/dev/null | head -c1)
        SLUICE_DESC="working tree at $(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo '?')${dirty:+ + uncommitted changes} (release profile)"
    fi
else
    SLUICE_DESC="$SLUICE_BIN (given)"
fi
[[ -x $SLUICE_BIN ]] || die "no sluice binary at $SLUICE_BIN"

# ---------------------------------------------------------------- processes
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
claim() { # claim PORT...: dies if one is in use
    local p
    for p in "$@"; do
        ! port_busy "$p" || die "port 127.0.0.1:$p is in use; set BASE_PORT to move the range"
    done
}

# start NAME CPUS CMD...: runs CMD in the foreground of a background job, pinned to CPUS (taskset list).
start() {
    local name=$1 cpus=$2
    shift 2
    taskset -c "$cpus" "$@" >"$TMP/$name.out" 2>&1 &
    PIDS+=("$!")
    PID[$name]=$!
}
# stop NAME: ends one process started by `start` (TERM, then KILL after 3 s).
stop() {
    local pid=${PID[$1]:-}
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset 'PID[$1]'
}

# wait_ok NAME PORT: waits (bounded, 10 s) until GET / answers "ok"; on failure shows the process's output
# and returns 1.
wait_ok() {
    local name=$1 port=$2 pid=${PID[$1]}
    for _ in $(seq 1 100); do
        if [[ $(curl -s --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null) == ok ]]; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -20 "$TMP/$name.out" >&2
            log "$name exited during start-up"
            return 1
        fi
        sleep 0.1
    done
    tail -20 "$TMP/$name.out" >&2
    log "$name did not answer on 127.0.0.1:$port within 10 s"
    return 1
}

nginx_common() { # nginx_common NAME [WORKERS]
    cat <<EOF
worker_processes ${2:-1};
pid $TMP/$1.pid;
error_log $TMP/$1-error.log warn;
events { worker_connections 8192; multi_accept on; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path $TMP/$1-tmp/body;
    proxy_temp_path $TMP/$1-tmp/proxy;
    fastcgi_temp_path $TMP/$1-tmp/fastcgi;
    uwsgi_temp_path $TMP/$1-tmp/uwsgi;
    scgi_temp_path $TMP/$1-tmp/scgi;
EOF
}

# start_backend NAME CPUS WORKERS PORT...: nginx answering "ok\n" to every GET on each port
start_backend() {
    local name=$1 cpus=$2 workers=$3 p
    shift 3
    claim "$@"
    mkdir -p "$TMP/$name-tmp"
    {
        nginx_common "$name" "$workers"
        echo "    server {"
        for p in "$@"; do echo "        listen 127.0.0.1:$p reuseport backlog=4096;"; done
        cat <<EOF
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
    } >"$TMP/$name.conf"
    start "$name" "$cpus" "$NGINX" -p "$TMP" -e "$TMP/$name-error.log" -c "$TMP/$name.conf" -g 'daemon off;'
    wait_ok "$name" "$1" || die "backend $name did not start"
    [[ $# -eq 1 ]] || wait_ok "$name" "${!#}" || die "backend $name did not start"
}

# start_nginx NAME CPUS WORKERS PORT BACKEND_PORT: nginx as a reverse proxy with upstream keep-alive
start_nginx() {
    local name=$1 cpus=$2 workers=$3 port=$4 bport=$5
    claim "$port"
    mkdir -p "$TMP/$name-tmp"
    {
        nginx_common "$name" "$workers"
        cat <<EOF
    upstream backend {
        server 127.0.0.1:$bport;
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$TMP/$name.conf"
    start "$name" "$cpus" "$NGINX" -p "$TMP" -e "$TMP/$name-error.log" -c "$TMP/$name.conf" -g 'daemon off;'
    wait_ok "$name" "$port" || die "nginx $name did not start"
}

# start_sluice NAME CPUS THREADS PORT ADMIN_PORT STRATEGY BACKEND_PORT...: STRATEGY is a TOML value. The
# config is first checked with `sluice check`; returns 1 (with the reason in SKIP_REASON) if sluice refuses
# it or does not come up.
SKIP_REASON=""
start_sluice() {
    local name=$1 cpus=$2 threads=$3 port=$4 admin=$5 strategy=$6 b list=""
    shift 6
    claim "$port" "$admin"
    for b in "$@"; do list+="${list:+, }\"127.0.0.1:$b\""; done
    cat >"$TMP/$name.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
threads = $threads
${SERVER_EXTRA:-}

[admin]
listen = "127.0.0.1:$admin"

[[pool]]
name = "bench"
strategy = $strategy
backends = [$list]

[[route]]
path_prefix = "/"
pool = "bench"
EOF
    if ! "$SLUICE_BIN" check --config "$TMP/$name.toml" >"$TMP/$name-check.out" 2>&1; then
        SKIP_REASON="sluice check refused strategy = $strategy: $({ grep -m1 -i 'error' "$TMP/$name-check.out" ||
            tail -1 "$TMP/$name-check.out"; } | sed -E 's/^error: ([^ ]*:[0-9]+:[0-9]+: )?//')"
        return 1
    fi
    SLUICE_LOG=warn start "$name" "$cpus" "$SLUICE_BIN" run --config "$TMP/$name.toml"
    if ! wait_ok "$name" "$port"; then
        stop "$name"
        SKIP_REASON="sluice with strategy = $strategy did not serve GET / (log: $(tail -1 "$TMP/$name.out"))"
        return 1
    fi
}

# ---------------------------------------------------------------- measurement targets
# Each target has a URL, the PID of its proxy process (none for direct), the CPUs it runs on, and how wrk
# loads it (CPUs, threads, connections, optional Lua script). GROUP is main, strat or scale; REF is the
# target its ratios are taken against.
declare -A URL PCPUS LCPUS WTHREADS WCONNS WSCRIPT LABEL REF
MAIN=() STRAT=() SCALE=()
add_target() { # add_target GROUP NAME LABEL URL PROXY_CPUS LOAD_CPUS WRK_THREADS WRK_CONNS SCRIPT REF
    local group=$1 t=$2
    LABEL[$t]=$3 URL[$t]=$4 PCPUS[$t]=$5 LCPUS[$t]=$6 WTHREADS[$t]=$7 WCONNS[$t]=$8 WSCRIPT[$t]=$9 REF[$t]=${10}
    case $group in
    main) MAIN+=("$t") ;;
    strat) STRAT+=("$t") ;;
    scale) SCALE+=("$t") ;;
    esac
}

# ---- section 1: single-core targets behind one backend
start_backend backend "$LOAD_CPU" 1 "$BACKEND_PORT"
add_main() { add_target main "$1" "$1" "$2" "$PROXY_CPU" "$LOAD_CPU" 1 "$CONNS" "" nginx; }
for t in $TARGETS; do
    case $t in
    direct) add_main direct "http://127.0.0.1:$BACKEND_PORT/" ;;
    nginx)
        start_nginx nginx "$PROXY_CPU" 1 "$NGINX_PORT" "$BACKEND_PORT"
        add_main nginx "http://127.0.0.1:$NGINX_PORT/"
        ;;
    sluice)
        start_sluice sluice "$PROXY_CPU" 1 "$SLUICE_PORT" "$SLUICE_ADMIN_PORT" '"builtin:round-robin"' "$BACKEND_PORT" ||
            die "$SKIP_REASON"
        add_main sluice "http://127.0.0.1:$SLUICE_PORT/"
        ;;
    sluice-pingora)
        SERVER_EXTRA='http1 = "pingora"' start_sluice sluice-pingora "$PROXY_CPU" 1 "$PINGORA_PORT" "$PINGORA_ADMIN_PORT" \
            '"builtin:round-robin"' "$BACKEND_PORT" || die "$SKIP_REASON"
        add_main sluice-pingora "http://127.0.0.1:$PINGORA_PORT/"
        ;;
    sluice-native)
        if start_sluice sluice-native "$PROXY_CPU" 1 "$NATIVE_PORT" "$NATIVE_ADMIN_PORT" '"native:round-robin"' "$BACKEND_PORT"; then
            add_main sluice-native "http://127.0.0.1:$NATIVE_PORT/"
        else
            log "skipping sluice-native: $SKIP_REASON"
            SKIPPED+=("sluice-native: $SKIP_REASON")
        fi
        ;;
    haproxy)
        ((HAVE_HAPROXY)) || continue
        claim "$HAPROXY_PORT"
        cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend be
backend be
    server s1 127.0.0.1:$BACKEND_PORT
EOF
        start haproxy "$PROXY_CPU" "$HAPROXY" -db -f "$TMP/haproxy.cfg"
        wait_ok haproxy "$HAPROXY_PORT" || die "haproxy did not start"
        add_main haproxy "http://127.0.0.1:$HAPROXY_PORT/"
        ;;
    caddy)
        ((HAVE_CADDY)) || continue
        claim "$CADDY_PORT"
        mkdir -p "$TMP/caddy-home"
        # Admin API off (we stop it by PID), no automatic HTTPS, state under the temp dir, only warnings logged.
        # Caddy keeps upstream connections alive by default; keepalive_idle_conns_per_host raises Go's idle pool
        # (default 2 per host in older versions) so that all CONNS connections can be reused.
        cat >"$TMP/Caddyfile" <<EOF
{
    admin off
    auto_https off
    storage file_system $TMP/caddy-home/data
    log {
        level WARN
    }
}
http://:$CADDY_PORT {
    bind 127.0.0.1
    reverse_proxy 127.0.0.1:$BACKEND_PORT {
        transport http {
            keepalive 120s
            keepalive_idle_conns 1024
            keepalive_idle_conns_per_host 1024
        }
    }
}
EOF
        start caddy "$PROXY_CPU" env GOMAXPROCS=1 HOME="$TMP/caddy-home" XDG_DATA_HOME="$TMP/caddy-home/data" \
            XDG_CONFIG_HOME="$TMP/caddy-home/config" "$CADDY" run --config "$TMP/Caddyfile" --adapter caddyfile
        if wait_ok caddy "$CADDY_PORT"; then
            add_main caddy "http://127.0.0.1:$CADDY_PORT/"
        else
            stop caddy
            log "skipping caddy: it did not start (see above)"
            SKIPPED+=("caddy: did not start: $(grep -m1 -i 'error' "$TMP/caddy.out" || tail -1 "$TMP/caddy.out")")
        fi
        ;;
    esac
done

# ---- section 2: every built-in strategy over STRAT_BACKENDS backends
STRAT_NOTE=""
if ((STRATEGIES)); then
    bports=()
    for i in $(seq 0 $((STRAT_BACKENDS - 1))); do bports+=($((STRAT_BACKEND_BASE + i))); done
    start_backend backend-64 "$LOAD_CPU" 1 "${bports[@]}"
    # The same request mix for every strategy: GET /k/0 ... /k/999 in turn, so ring-hash and maglev
    # (key = "path") spread the load. Requests are formatted once, in init, to keep wrk's cost low.
    cat >"$TMP/keys.lua" <<'EOF'
local reqs, i, n = {}, 0, 1000
function init(args)
    for k = 0, n - 1 do reqs[k] = wrk.format("GET", "/k/" .. k) end
end
function request()
    i = (i + 1) % n
    return reqs[i]
end
EOF
    if [[ -n $STRATEGY_LIST ]]; then
        names=$STRATEGY_LIST
    else
        # The binary names its built-ins when asked for one it does not have (sluice check binds nothing).
        printf '[server]\nlisten = ["127.0.0.1:%s"]\n[admin]\nlisten = "127.0.0.1:%s"\n[[pool]]\nname = "probe"\nstrategy = "builtin:no-such-strategy"\nbackends = ["127.0.0.1:%s"]\n[[route]]\npath_prefix = "/"\npool = "probe"\n' \
            "$STRAT_PROXY_BASE" $((STRAT_PROXY_BASE + 1)) "$STRAT_BACKEND_BASE" >"$TMP/probe.toml"
        names=$({ "$SLUICE_BIN" check --config "$TMP/probe.toml" 2>&1 || true; } | sed -n 's/.*built-ins are: \([a-z0-9, -]*\).*/\1/p' | head -1 | tr -d ,)
        if [[ -z $names ]]; then
            log "could not read the list of built-ins from 'sluice check'; using the documented strategies"
            names="round-robin weighted-round-robin random least-connections p2c peak-ewma ip-hash ring-hash maglev"
        fi
        names+=" native:round-robin"
    fi
    # round-robin first: it is the reference
    ordered=()
    for s in $names; do [[ ${s#builtin:} == round-robin ]] && ordered+=("$s"); done
    for s in $names; do [[ ${s#builtin:} == round-robin ]] || ordered+=("$s"); done
    i=0
    ref=""
    for s in "${ordered[@]}"; do
        ((i < 40)) || { log "more than 40 strategies; measuring the first 40"; break; }
        case $s in
        *:*) spec=$s ;;
        *) spec=builtin:$s ;;
        esac
        case ${spec#*:} in
        ring-hash | maglev) toml="{ plugin = \"$spec\", config = { key = \"path\", fallback = \"random\" } }" ;;
        *) toml="\"$spec\"" ;;
        esac
        label=${spec#builtin:}
        t=st-${spec//:/-}
        port=$((STRAT_PROXY_BASE + 2 * i))
        i=$((i + 1))
        if start_sluice "$t" "$PROXY_CPU" 1 "$port" $((port + 1)) "$toml" "${bports[@]}"; then
            if [[ -z $ref && $spec == builtin:round-robin ]]; then ref=$t; fi
            add_target strat "$t" "$label" "http://127.0.0.1:$port/" "$PROXY_CPU" "$LOAD_CPU" 1 "$CONNS" "$TMP/keys.lua" ""
        elif grep -q 'sluice_set_backends\|not a strategy' "$TMP/$t-check.out" 2>/dev/null; then
            log "$label is not a strategy (a health check plugin); not measured"
        else
            log "skipping strategy $label: $SKIP_REASON"
            SKIPPED+=("strategy $label: $SKIP_REASON")
        fi
    done
    for t in "${STRAT[@]}"; do REF[$t]=$ref; done
    [[ -n $ref ]] || STRAT_NOTE="builtin:round-robin was not measured, so there are no ratios"
fi

# ---- section 4 (measured together with the others): N workers on N CPUs
SCALE_NOTE=""
if [[ -z ${WORKERS// /} ]]; then
    SCALE_NOTE="skipped (WORKERS is empty)"
elif ((NCPU <= 2)); then
    SCALE_NOTE="skipped: this machine has $NCPU CPUs; 2 and 4 workers need more than 2 (N for the proxy, the rest for wrk and the backend)"
else
    k=0
    for n in $WORKERS; do
        if ((n + 1 > NCPU)); then
            log "workers=$n needs $((n + 1)) CPUs ($n for the proxy, 1+ for the load); this machine has $NCPU: skipped"
            SCALE_NOTE+="${SCALE_NOTE:+; }$n workers skipped (needs $((n + 1)) CPUs, have $NCPU)"
            continue
        fi
        pc=$(seq -s, 0 $((n - 1)))
        lc=$(seq -s, "$n" $((NCPU - 1)))
        nload=$((NCPU - n))
        ((nload <= 4)) || nload=4
        wconns=$CONNS
        ((wconns >= nload)) || wconns=$nload
        port0=$((SCALE_BASE + 10 * k))
        k=$((k + 1))
        start_backend "backend-w$n" "$lc" "$nload" "$port0"
        start_nginx "nginx-w$n" "$pc" "$n" $((port0 + 1)) "$port0"
        add_target scale "nginx-w$n" "nginx-w$n" "http://127.0.0.1:$((port0 + 1))/" "$pc" "$lc" "$nload" "$wconns" "" "nginx-w$n"
        if start_sluice "sluice-w$n" "$pc" "$n" $((port0 + 2)) $((port0 + 3)) '"builtin:round-robin"' "$port0"; then
            add_target scale "sluice-w$n" "sluice-w$n" "http://127.0.0.1:$((port0 + 2))/" "$pc" "$lc" "$nload" "$wconns" "" "nginx-w$n"
        else
            die "$SKIP_REASON"
        fi
    done
fi

ALL=("${MAIN[@]}" "${STRAT[@]}" "${SCALE[@]}")
((${#ALL[@]} > 0)) || die "nothing to measure"

# ---------------------------------------------------------------- measuring
# cpu_ticks CPUS -> "busy total" jiffies from /proc/stat, summed over the comma-separated CPU list
cpu_ticks() {
    awk -v l="$1" 'BEGIN { n = split(l, a, ","); for (i = 1; i <= n; i++) want["cpu" a[i]] = 1 }
        ($1 in want) { t = 0; for (i = 2; i <= NF; i++) t += $i; busy += t - $5 - $6; tot += t }
        END { print busy + 0, tot + 0 }' /proc/stat
}
# proc_ticks PID -> utime+stime jiffies of PID (all its threads) plus its direct children (nginx workers)
proc_ticks() {
    local p kids
    kids=$(cat /proc/"$1"/task/*/children 2>/dev/null || true)
    for p in "$1" $kids; do cat "/proc/$p/stat" 2>/dev/null || true; done |
        awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END { print t + 0 }'
}
CLK_TCK=$(getconf CLK_TCK)
now_ns() { date +%s%N; }
busy_pct() { # busy_pct "b0 t0" "b1 t1"
    local b0 t0 b1 t1
    read -r b0 t0 <<<"$1"
    read -r b1 t1 <<<"$2"
    awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN { printf "%.0f", (t > 0 ? 100 * b / t : 0) }'
}

# latency_us PCT FILE: wrk's latency percentile in microseconds
latency_us() {
    awk -v p="$1" '$1 == p { v = $2; m = 1
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000
        sub(/[a-z]+$/, "", v); printf "%.0f", v * m }' "$2"
}

# wrk_args TARGET -> the wrk options for it, one per line
wrk_args() {
    printf '%s\n' "-t${WTHREADS[$1]}" "-c${WCONNS[$1]}"
    [[ -z ${WSCRIPT[$1]} ]] || printf '%s\n' -s "${WSCRIPT[$1]}"
}

declare -A RPS P50 P99 CPU_P CPU_L OWN PER_CPU_S ERRS
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $LOAD_BEFORE; $NCPU CPUs; single-core targets on CPU $PROXY_CPU, wrk + backend on CPU $LOAD_CPU"
log "measuring ${#ALL[@]} targets x $RUNS round(s) x $((WARMUP + DURATION)) s"

measure() { # measure TARGET ROUND
    local t=$1 round=$2 args ppid="" pt0=0 pt1=0 w0 w1 p0 p1 l0 l1 out rps errs own=""
    mapfile -t args < <(wrk_args "$t")
    local url=${URL[$t]} lc=${LCPUS[$t]}
    if ((WARMUP > 0)); then
        taskset -c "$lc" timeout $((WARMUP + 10)) wrk "${args[@]}" -d"${WARMUP}s" "$url" >/dev/null 2>&1 ||
            die "warm-up wrk against $t failed"
    fi
    [[ $t == direct ]] || ppid=${PID[$t]}
    [[ -z $ppid ]] || pt0=$(proc_ticks "$ppid")
    w0=$(now_ns)
    p0=$(cpu_ticks "${PCPUS[$t]}")
    l0=$(cpu_ticks "$lc")
    out=$TMP/wrk-$t-$round.txt
    taskset -c "$lc" timeout $((DURATION + 30)) wrk "${args[@]}" -d"${DURATION}s" --latency "$url" >"$out" 2>&1 ||
        { cat "$out" >&2; die "wrk against $t failed"; }
    p1=$(cpu_ticks "${PCPUS[$t]}")
    l1=$(cpu_ticks "$lc")
    w1=$(now_ns)
    [[ -z $ppid ]] || pt1=$(proc_ticks "$ppid")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    [[ -n $rps ]] || { cat "$out" >&2; die "no Requests/sec in wrk output for $t"; }
    errs=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i } END { print n + 0 }' "$out")
    RPS[$t]+="$rps "
    P50[$t]+="$(latency_us 50% "$out") "
    P99[$t]+="$(latency_us 99% "$out") "
    CPU_P[$t]+="$(busy_pct "$p0" "$p1") "
    # requests per second of proxy CPU time: robust against other work sharing the proxy's CPUs
    if [[ -n $ppid ]]; then
        own=$(awk -v d=$((pt1 - pt0)) -v hz="$CLK_TCK" -v w=$((w1 - w0)) 'BEGIN { printf "%.3f", d / hz / (w / 1e9) }')
        OWN[$t]+="$own "
        PER_CPU_S[$t]+="$(awk -v r="$rps" -v o="$own" 'BEGIN { printf "%.0f", (o > 0 ? r / o : 0) }') "
    fi
    CPU_L[$t]+="$(busy_pct "$l0" "$l1") "
    ERRS[$t]=$((${ERRS[$t]:-0} + errs))
    log "round $round/$RUNS ${LABEL[$t]}: $rps req/s (CPUs ${PCPUS[$t]} busy $(busy_pct "$p0" "$p1")%, CPUs $lc busy $(busy_pct "$l0" "$l1")%${ppid:+, proxy process ${own} CPUs}, errors $errs)"
}

for round in $(seq 1 "$RUNS"); do
    for t in "${ALL[@]}"; do measure "$t" "$round"; done
done

# ---- section 3: latency at a fixed offered rate (open loop, corrected for coordinated omission)
declare -A L50 L90 L99 LMAX LRPS LERR
LAT=()
if ((LATENCY)) && [[ -n $OHA ]]; then
    LAT=("${MAIN[@]}")
    # oha: -q RATE sends on a fixed schedule; --latency-correction measures from the scheduled send time;
    # -w waits for the requests in flight at the deadline instead of counting them as errors; one runtime
    # thread, as oha runs on the one CPU $LOAD_CPU (with the backend).
    oha_run() { # oha_run URL SECONDS OUT
        taskset -c "$LOAD_CPU" timeout $(($2 + 30)) "$OHA" -z "$2s" -c "$LAT_CONNS" -q "$RATE" --latency-correction -w \
            --worker-threads 1 --no-tui --output-format json "$1" >"$3" 2>"$3.err" ||
            { head -c 2000 "$3" "$3.err" >&2; return 1; }
    }
    log "latency at $RATE req/s: ${#LAT[@]} targets x $RUNS round(s) x $((WARMUP + LAT_DURATION)) s ($("$OHA" --version 2>/dev/null | head -1))"
    for round in $(seq 1 "$RUNS"); do
        for t in "${LAT[@]}"; do
            if ((WARMUP > 0)); then
                oha_run "${URL[$t]}" "$WARMUP" "$TMP/oha-warmup-$t.json" || die "warm-up oha against $t failed"
            fi
            out=$TMP/oha-$t-$round.json
            oha_run "${URL[$t]}" "$LAT_DURATION" "$out" || die "oha against $t failed"
            # seconds -> microseconds; errors = non-2xx answers + transport errors
            row=$(jq -r '(.latencyPercentiles // {}) as $p | (.summary // {}) as $s
                | ([$p.p50, $p.p90, $p.p99, $s.slowest] | map((. // 0) * 1000000 | round))
                  + [($s.requestsPerSec // 0 | round),
                     ([(.statusCodeDistribution // {}) | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0)
                     + ([(.errorDistribution // {}) | to_entries[] | .value] | add // 0)]
                | @tsv' "$out") ||
                { head -c 2000 "$out" >&2; die "cannot read oha's JSON for $t"; }
            read -r a b c d e f <<<"$row"
            L50[$t]+="$a " L90[$t]+="$b " L99[$t]+="$c " LMAX[$t]+="$d " LRPS[$t]+="$e "
            LERR[$t]=$((${LERR[$t]:-0} + f))
            log "latency round $round/$RUNS $t: p50 ${a} µs, p90 ${b} µs, p99 ${c} µs, max ${d} µs at ${e} req/s, errors $f"
        done
    done
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

if [[ -n $PERF_OUT && -n ${PID[sluice]:-} ]]; then
    mkdir -p "$PERF_OUT"
    PERF_OUT=$(cd "$PERF_OUT" && pwd)
    log "profiling sluice for ${DURATION}s under the same load (perf record -e cpu-clock, not counted in the table)"
    taskset -c "$LOAD_CPU" timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"$((DURATION + 2))s" "${URL[sluice]}" >"$PERF_OUT/wrk-during-perf.txt" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
    sleep 1
    taskset -c "$LOAD_CPU" timeout $((DURATION + 60)) perf record -q -e cpu-clock -F 997 --call-graph dwarf,16384 \
        -p "${PID[sluice]}" -o "$PERF_OUT/perf.data" -- sleep "$DURATION" >"$PERF_OUT/perf-record.log" 2>&1 ||
        log "perf record failed: $(tail -3 "$PERF_OUT/perf-record.log")"
    wait "$WRK_PID" || true
    if [[ -s $PERF_OUT/perf.data ]]; then
        perf report -i "$PERF_OUT/perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0.3 \
            2>/dev/null | sed -E 's/[[:space:]]+(-[[:space:]]+)*$//' >"$PERF_OUT/perf-report.txt" || true
        perf report -i "$PERF_OUT/perf.data" --no-children --sort dso --stdio -g none \
            2>/dev/null | sed -E 's/[[:space:]]+(-[[:space:]]+)*$//' >"$PERF_OUT/perf-report-dso.txt" || true
        perf report -i "$PERF_OUT/perf.data" --children --sort symbol --stdio -g none --percent-limit 2 \
            2>/dev/null | sed -E 's/[[:space:]]+(-[[:space:]]+)*$//' >"$PERF_OUT/perf-report-children.txt" || true
        log "perf profile: $PERF_OUT/perf-report.txt (self), perf-report-children.txt (inclusive), perf-report-dso.txt"
    fi
fi

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
maximum() { tr ' ' '\n' | awk 'NF' | sort -g | tail -1; }
med() { if [[ -n ${1:-} ]]; then echo "${MED[$1]:-}"; fi; }            # median req/s of a target, or nothing
med_cpu() { if [[ -n ${1:-} ]]; then echo "${MED_CPU_S[$1]:-}"; fi; }  # median req/CPU-s of a target, or nothing
ratio() { # ratio A B: A/B with 2 decimals, or "-" when either is missing or B is 0
    awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'
}

# ---------------------------------------------------------------- report
declare -A MED MED_CPU_S
for t in "${ALL[@]}"; do
    MED[$t]=$(median <<<"${RPS[$t]}")
    [[ -z ${PER_CPU_S[$t]:-} ]] || MED_CPU_S[$t]=$(median <<<"${PER_CPU_S[$t]}")
done

# table TARGET...: one row per target; "rel" columns are ratios to REF[target], stated in each section's heading.
# (In the printf formats, a header holding "µ" gets one more byte of width: printf counts bytes.)
table() {
    local t rounds per_cpu r
    printf '| %-20s | %8s | %-24s | %9s | %9s | %13s | %7s | %7s | %9s | %8s | %6s |\n' target "req/s" "req/s per round" \
        "req/CPU-s" "rel req/s" "rel req/CPU-s" "p50 µs" "p99 µs" "proxy CPU" "load CPU" errors
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------------- ---------: -------------------------- ----------: \
        ----------: --------------: -------: -------: ----------: ---------: -------:
    for t in "$@"; do
        rounds=$(for r in ${RPS[$t]}; do printf '%.0f ' "$r"; done)
        per_cpu="-"
        [[ -z ${MED_CPU_S[$t]:-} ]] || per_cpu=$(printf '%.0f' "${MED_CPU_S[$t]}")
        r=${REF[$t]}
        printf '| %-20s | %8.0f | %-24s | %9s | %9s | %13s | %6.0f | %6.0f | %9s | %8s | %6s |\n' "${LABEL[$t]}" "${MED[$t]}" "${rounds% }" \
            "$per_cpu" "$(ratio "$(med "$t")" "$(med "$r")")" "$(ratio "$(med_cpu "$t")" "$(med_cpu "$r")")" \
            "$(median <<<"${P50[$t]}")" "$(median <<<"${P99[$t]}")" "$(printf '%.0f' "$(median <<<"${CPU_P[$t]}")")%" \
            "$(printf '%.0f' "$(median <<<"${CPU_L[$t]}")")%" "${ERRS[$t]}"
    done
}

echo
echo "sluice load test, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "sluice: $SLUICE_DESC"
echo "wrk -c$CONNS -d${DURATION}s (+${WARMUP}s warm-up), $RUNS round(s), median shown, all targets interleaved per round;"
printf '%s\n' 'HTTP/1.1 keep-alive, GET / -> 200 "ok\n"'
echo "load average (1/5/15 min): before $LOAD_BEFORE, after $LOAD_AFTER; $NCPU CPUs"

if ((${#MAIN[@]} > 0)); then
    echo
    echo "## 1. one proxy core: proxy on CPU $PROXY_CPU; wrk -t1 and the backend (nginx, 1 worker) on CPU $LOAD_CPU;"
    echo "rel = ratio to nginx"
    echo
    table "${MAIN[@]}"
    r=$(ratio "$(med sluice-native)" "$(med sluice)")
    [[ $r == - ]] || echo "sluice-native / sluice = $r (req/s), $(ratio "$(med_cpu sluice-native)" "$(med_cpu sluice)") (req/CPU-s)"
    r=$(ratio "$(med sluice)" "$(med direct)")
    [[ $r == - ]] || echo "sluice / direct = $r (req/s)"
fi

if ((STRATEGIES)); then
    echo
    echo "## 2. strategies: sluice threads = 1 on CPU $PROXY_CPU over $STRAT_BACKENDS backends (one nginx, 1 worker, on CPU $LOAD_CPU);"
    echo "wrk GET /k/0../k/999 in turn (Lua); ring-hash and maglev: key = \"path\"; rel = ratio to builtin:round-robin"
    echo
    if ((${#STRAT[@]} > 0)); then table "${STRAT[@]}"; else echo "(no strategy could be measured)"; fi
    [[ -z $STRAT_NOTE ]] || echo "$STRAT_NOTE"
    [[ -z ${MED[st-builtin-ip-hash]:-} ]] || echo "ip-hash: every request comes from 127.0.0.1, so it sends all of them to one backend."
fi

if ((${#LAT[@]} > 0)); then
    echo
    echo "## 3. latency at a fixed rate: oha -q $RATE --latency-correction -c $LAT_CONNS -z ${LAT_DURATION}s (+${WARMUP}s warm-up),"
    echo "open loop: each request is timed from when it was due to be sent. Median of $RUNS round(s); max = the largest of all rounds."
    echo
    printf '| %-20s | %9s | %9s | %9s | %9s | %9s | %10s | %6s |\n' target "offered" "achieved" "p50 µs" "p90 µs" "p99 µs" "max µs" errors
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------------- ----------: ----------: ---------: ---------: ---------: ----------: -------:
    sat=""
    for t in "${LAT[@]}"; do
        mark=""
        if [[ -n ${MED[$t]:-} ]] && awk -v r="$RATE" -v m="${MED[$t]}" 'BEGIN { exit !(r > 0.8 * m) }'; then mark=" (!)"; sat=1; fi
        printf '| %-20s | %9s | %9.0f | %8.0f | %8.0f | %8.0f | %9.0f | %6s |\n' "$t$mark" "$RATE" "$(median <<<"${LRPS[$t]}")" \
            "$(median <<<"${L50[$t]}")" "$(median <<<"${L90[$t]}")" "$(median <<<"${L99[$t]}")" "$(maximum <<<"${LMAX[$t]}")" "${LERR[$t]}"
    done
    [[ -z $sat ]] || echo "(!) RATE is above 80% of this target's measured req/s: its latency is near saturation, not below it."
fi


echo
echo "## 4. N workers on N CPUs (nginx worker_processes N, sluice threads = N; wrk and the backend on the other CPUs);"
echo "rel = ratio to nginx with the same N"
echo
if ((${#SCALE[@]} > 0)); then
    table "${SCALE[@]}"
    for t in "${SCALE[@]}"; do
        base=${t%-w*}
        r=$(ratio "$(med "$t")" "$(med "$base")")
        [[ $r == - ]] || echo "${LABEL[$t]} / $base (1 worker) = $r (req/s)"
    done
fi
[[ -z $SCALE_NOTE ]] || echo "$SCALE_NOTE"

echo
echo "req/CPU-s = requests per second of CPU time used by the proxy process (utime+stime of all its threads and"
echo "  child processes, e.g. nginx workers, from /proc/PID/stat over the measured window); it does not depend on other"
echo "  work sharing the proxy's CPUs. proxy CPU / load CPU = how busy those CPUs were (everything on them, not"
echo "  only our processes). In the direct row the proxy CPU should be idle: if it is not, something else was"
echo "  running. A row with the load CPU near 100% may be capped by wrk + backend rather than by the proxy."
for s in "${SKIPPED[@]}"; do echo "skipped: $s"; done
if [[ -n ${PID[sluice]:-} && -n ${MED[sluice]:-} ]]; then
    threads=$(find "/proc/${PID[sluice]}/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "sluice process had $threads OS threads (all pinned to CPU $PROXY_CPU)"
fi
