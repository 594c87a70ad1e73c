#!/usr/bin/env bash
# Load test: requests per second per core, sluice vs nginx (vs haproxy) vs the backend alone.
#
#   benches/load/run.sh                      # build sluice (release profile) if needed, measure, print a table
#   DURATION=20 RUNS=3 benches/load/run.sh   # longer runs, 3 rounds; the table shows the median
#
# Everything runs on 127.0.0.1. The proxy under test is pinned to CPU $PROXY_CPU, wrk and the backend
# to CPU $LOAD_CPU (taskset), so "requests/s" is the throughput of one proxy core. Every process this
# script starts is killed on exit.
#
# Knobs (environment):
#   DURATION=10    seconds per measurement (wrk -d)        WARMUP=2   seconds of wrk before each measurement
#   CONNS=64       wrk connections (wrk -c)                RUNS=1     rounds; targets are interleaved per round
#   PROXY_CPU=0    CPU for the proxy under test            LOAD_CPU=1 CPU for wrk and the backend
#   BASE_PORT=18080  ports BASE_PORT+1.. are used (backend, nginx, sluice, sluice admin, haproxy)
#   TARGETS="direct nginx sluice haproxy"   which to measure (haproxy is skipped if it cannot be installed)
#   SLUICE_BIN=path  use this sluice binary, do not build
#   SLUICE_REV=rev   build sluice from a `git archive` snapshot of commit `rev` (into target/loadtest/) instead
#                    of the working tree, e.g. when the working tree does not build right now
#   KEEP_TMP=1       keep the temp dir (configs, logs, raw wrk output)
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
TARGETS=${TARGETS:-direct nginx sluice haproxy}
SLUICE_BIN=${SLUICE_BIN:-}
SLUICE_REV=${SLUICE_REV:-}
KEEP_TMP=${KEEP_TMP:-0}
PERF_OUT=${PERF_OUT:-}

BACKEND_PORT=$((BASE_PORT + 1))
NGINX_PORT=$((BASE_PORT + 2))
SLUICE_PORT=$((BASE_PORT + 3))
SLUICE_ADMIN_PORT=$((BASE_PORT + 4))
HAPROXY_PORT=$((BASE_PORT + 5))

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] error: %s\n' "$*" >&2; exit 1; }

for v in DURATION WARMUP CONNS RUNS PROXY_CPU LOAD_CPU BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
((DURATION >= 1 && DURATION <= 600)) || die "DURATION must be 1..600 seconds"
((RUNS >= 1 && RUNS <= 20)) || die "RUNS must be 1..20"
((CONNS >= 1 && CONNS <= 10000)) || die "CONNS must be 1..10000"

# ---------------------------------------------------------------- dependencies
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
APT_UPDATED=0
apt_install() {
    if ((APT_UPDATED == 0)); then
        "${SUDO[@]}" apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    # policy-rc.d is not touched: installing nginx/haproxy may try to start the system service; we
    # never use it (ours run from a temp prefix on our own ports).
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    [[ -x /usr/sbin/$1 ]] && return 0
    log "installing $2"
    apt_install "$2" || die "cannot install $2 (apt-get install $2)"
}
need wrk wrk
need nginx nginx
need curl curl
need taskset util-linux
[[ -z $PERF_OUT ]] || need perf linux-perf
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

HAVE_HAPROXY=0
if [[ " $TARGETS " == *" haproxy "* ]]; then
    if command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]]; then
        HAVE_HAPROXY=1
    else
        log "installing haproxy (optional)"
        if apt_install haproxy 2>/dev/null; then HAVE_HAPROXY=1; else log "haproxy not installable; skipping it"; fi
    fi
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

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

# ---------------------------------------------------------------- processes and clean-up
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-load.XXXXXX")
PIDS=()
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

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$BACKEND_PORT" "$NGINX_PORT" "$SLUICE_PORT" "$SLUICE_ADMIN_PORT" "$HAPROXY_PORT"; do
    port_busy "$p" && die "port 127.0.0.1:$p is in use; set BASE_PORT to move the range"
done

# start NAME CPU CMD...: runs CMD in the foreground of a background job, pinned to CPU.
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$TMP/$name.out" 2>&1 &
    PIDS+=("$!")
    eval "PID_${name//-/_}=$!"
}

# wait_ok NAME PORT: waits (bounded, 10 s) until GET / answers "ok".
wait_ok() {
    local name=$1 port=$2 pidvar="PID_${1//-/_}"
    for _ in $(seq 1 100); do
        if [[ $(curl -s --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null) == ok ]]; then return 0; fi
        kill -0 "${!pidvar}" 2>/dev/null || { cat "$TMP/$name.out" >&2; die "$name exited during start-up"; }
        sleep 0.1
    done
    cat "$TMP/$name.out" >&2
    die "$name did not answer on 127.0.0.1:$port within 10 s"
}

nginx_common() { # nginx_common NAME
    cat <<EOF
worker_processes 1;
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

# ---------------------------------------------------------------- backend: nginx, 1 worker, returns "ok\n"
mkdir -p "$TMP/backend-tmp"
{
    nginx_common backend
    cat <<EOF
    server {
        listen 127.0.0.1:$BACKEND_PORT reuseport backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
EOF
} >"$TMP/backend.conf"
start backend "$LOAD_CPU" "$NGINX" -p "$TMP" -e "$TMP/backend-error.log" -c "$TMP/backend.conf" -g 'daemon off;'
wait_ok backend "$BACKEND_PORT"

# ---------------------------------------------------------------- the proxies
declare -A URL=([direct]="http://127.0.0.1:$BACKEND_PORT/")
ACTIVE=()
for t in $TARGETS; do
    case $t in
    direct) ACTIVE+=(direct) ;;
    nginx)
        mkdir -p "$TMP/nginx-tmp"
        {
            nginx_common nginx
            cat <<EOF
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT reuseport backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
        } >"$TMP/nginx.conf"
        start nginx "$PROXY_CPU" "$NGINX" -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" -g 'daemon off;'
        wait_ok nginx "$NGINX_PORT"
        URL[nginx]="http://127.0.0.1:$NGINX_PORT/"
        ACTIVE+=(nginx)
        ;;
    sluice)
        cat >"$TMP/sluice.toml" <<EOF
[server]
listen = ["127.0.0.1:$SLUICE_PORT"]
threads = 1

[admin]
listen = "127.0.0.1:$SLUICE_ADMIN_PORT"

[[pool]]
name = "bench"
strategy = "builtin:round-robin"
backends = ["127.0.0.1:$BACKEND_PORT"]

[[route]]
path_prefix = "/"
pool = "bench"
EOF
        SLUICE_LOG=warn start sluice "$PROXY_CPU" "$SLUICE_BIN" run --config "$TMP/sluice.toml"
        wait_ok sluice "$SLUICE_PORT"
        URL[sluice]="http://127.0.0.1:$SLUICE_PORT/"
        ACTIVE+=(sluice)
        ;;
    haproxy)
        ((HAVE_HAPROXY)) || continue
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
        wait_ok haproxy "$HAPROXY_PORT"
        URL[haproxy]="http://127.0.0.1:$HAPROXY_PORT/"
        ACTIVE+=(haproxy)
        ;;
    *) die "unknown target '$t' (known: direct nginx sluice haproxy)" ;;
    esac
done
((${#ACTIVE[@]} > 0)) || die "nothing to measure"

# ---------------------------------------------------------------- measuring
# cpu_ticks CPU -> "busy total" jiffies from /proc/stat
cpu_ticks() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
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

declare -A OWN PER_CPU_S
declare -A RPS P50 P99 CPU_P CPU_L ERRS
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $LOAD_BEFORE; $NCPU CPUs; proxy on CPU $PROXY_CPU, wrk + backend on CPU $LOAD_CPU"

for round in $(seq 1 "$RUNS"); do
    for t in "${ACTIVE[@]}"; do
        url=${URL[$t]}
        if ((WARMUP > 0)); then
            taskset -c "$LOAD_CPU" timeout $((WARMUP + 10)) wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 ||
                die "warm-up wrk against $t failed"
        fi
        ppid=""
        [[ $t == direct ]] || { pidvar="PID_$t"; ppid=${!pidvar}; }
        pt0=$([[ -n $ppid ]] && proc_ticks "$ppid" || echo 0)
        w0=$(now_ns)
        p0=$(cpu_ticks "$PROXY_CPU")
        l0=$(cpu_ticks "$LOAD_CPU")
        out=$TMP/wrk-$t-$round.txt
        taskset -c "$LOAD_CPU" timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url" >"$out" 2>&1 ||
            { cat "$out" >&2; die "wrk against $t failed"; }
        p1=$(cpu_ticks "$PROXY_CPU")
        l1=$(cpu_ticks "$LOAD_CPU")
        w1=$(now_ns)
        pt1=$([[ -n $ppid ]] && proc_ticks "$ppid" || echo 0)
        rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
        [[ -n $rps ]] || { cat "$out" >&2; die "no Requests/sec in wrk output for $t"; }
        errs=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i } END { print n + 0 }' "$out")
        RPS[$t]+="$rps "
        P50[$t]+="$(latency_us 50% "$out") "
        P99[$t]+="$(latency_us 99% "$out") "
        CPU_P[$t]+="$(busy_pct "$p0" "$p1") "
        # requests per second of proxy CPU time: robust against other work sharing the proxy's CPU
        if [[ -n $ppid ]]; then
            own=$(awk -v d=$((pt1 - pt0)) -v hz="$CLK_TCK" -v w=$((w1 - w0)) 'BEGIN { printf "%.3f", d / hz / (w / 1e9) }')
            OWN[$t]+="$own "
            PER_CPU_S[$t]+="$(awk -v r="$rps" -v o="$own" 'BEGIN { printf "%.0f", (o > 0 ? r / o : 0) }') "
        fi
        CPU_L[$t]+="$(busy_pct "$l0" "$l1") "
        ERRS[$t]=$((${ERRS[$t]:-0} + errs))
        log "round $round/$RUNS $t: $rps req/s (CPU $PROXY_CPU busy $(busy_pct "$p0" "$p1")%, CPU $LOAD_CPU busy $(busy_pct "$l0" "$l1")%${ppid:+, proxy process ${own} CPUs}, errors $errs)"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

if [[ -n $PERF_OUT && -n ${PID_sluice:-} ]]; then
    mkdir -p "$PERF_OUT"
    PERF_OUT=$(cd "$PERF_OUT" && pwd)
    log "profiling sluice for ${DURATION}s under the same load (perf record -e cpu-clock, not counted in the table)"
    taskset -c "$LOAD_CPU" timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"$((DURATION + 2))s" "${URL[sluice]}" >"$PERF_OUT/wrk-during-perf.txt" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
    sleep 1
    taskset -c "$LOAD_CPU" timeout $((DURATION + 60)) perf record -q -e cpu-clock -F 997 --call-graph dwarf,16384 \
        -p "$PID_sluice" -o "$PERF_OUT/perf.data" -- sleep "$DURATION" >"$PERF_OUT/perf-record.log" 2>&1 ||
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

# ---------------------------------------------------------------- report
echo
echo "sluice load test, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "sluice: $SLUICE_DESC"
echo "wrk -t1 -c$CONNS -d${DURATION}s (+${WARMUP}s warm-up), $RUNS round(s), median shown; HTTP/1.1 keep-alive, GET / -> 200 \"ok\\n\""
echo "pinning: proxy under test on CPU $PROXY_CPU; wrk and the backend (nginx, 1 worker) on CPU $LOAD_CPU (taskset); $NCPU CPUs"
echo "load average (1/5/15 min): before $LOAD_BEFORE, after $LOAD_AFTER"
echo
printf '| %-8s | %8s | %-24s | %12s | %6s | %6s | %6s | %6s | %6s |\n' target "req/s" "req/s per round" "req/CPU-s" "p50 µs" "p99 µs" "CPU $PROXY_CPU" "CPU $LOAD_CPU" errors
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ---------: -------------------------- -------------: -------: -------: -------: -------: -------:
declare -A MED MED_CPU_S
for t in "${ACTIVE[@]}"; do
    MED[$t]=$(median <<<"${RPS[$t]}")
    rounds=$(for r in ${RPS[$t]}; do printf '%.0f ' "$r"; done)
    cpu_p="$(median <<<"${CPU_P[$t]}")%"
    cpu_l="$(median <<<"${CPU_L[$t]}")%"
    per_cpu="-"
    if [[ -n ${PER_CPU_S[$t]:-} ]]; then
        MED_CPU_S[$t]=$(median <<<"${PER_CPU_S[$t]}")
        per_cpu=$(printf '%.0f' "${MED_CPU_S[$t]}")
    fi
    printf '| %-8s | %8.0f | %-24s | %12s | %6.0f | %6.0f | %6s | %6s | %6s |\n' "$t" "${MED[$t]}" "${rounds% }" "$per_cpu" \
        "$(median <<<"${P50[$t]}")" "$(median <<<"${P99[$t]}")" "$cpu_p" "$cpu_l" "${ERRS[$t]}"
done
echo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
pair() { # pair A B: ratio of medians, req/s and req/CPU-s
    [[ -n ${MED[$1]:-} && -n ${MED[$2]:-} ]] || return 0
    local line
    line=$(printf '%-7s / %-7s = %s (req/s)' "$1" "$2" "$(ratio "${MED[$1]}" "${MED[$2]}")")
    if [[ -n ${MED_CPU_S[$1]:-} && -n ${MED_CPU_S[$2]:-} ]]; then
        line+=", $(ratio "${MED_CPU_S[$1]}" "${MED_CPU_S[$2]}") (req/CPU-s)"
    fi
    echo "$line"
}
pair sluice nginx
pair sluice haproxy
pair sluice direct
pair nginx direct
pair haproxy direct
echo
echo "req/CPU-s = requests per second of CPU time used by the proxy process (all threads, nginx workers included);"
echo "  it does not depend on other work sharing CPU $PROXY_CPU. CPU $PROXY_CPU / CPU $LOAD_CPU = how busy each CPU was"
echo "  (everything on it, not only our processes). In the direct row CPU $PROXY_CPU should be idle: if it is not,"
echo "  something else was running on the machine. A proxy row with CPU $LOAD_CPU near 100% may be capped by wrk + backend."
if [[ -n ${PID_sluice:-} && -n ${MED[sluice]:-} ]]; then
    threads=$(ls "/proc/$PID_sluice/task" 2>/dev/null | wc -l)
    echo "sluice process had $threads OS threads (all pinned to CPU $PROXY_CPU)"
fi
