#!/usr/bin/env bash
# compare.sh: the same closed-loop scenarios against several servers, side by side, in one run.
#
#   benchmarks/compare.sh                          the default servers (below)
#   benchmarks/compare.sh NAME='COMMAND {port}' …  these servers instead
#
# Default servers: c_floor (benchmarks/upper_epoll.c, when a C compiler is present), asyncio
# (streams), asyncio_proto (Protocol), naive_sockserv (socketserver, defaults) and tcp_upper (this
# checkout). BEFORE=DIR adds a "before" row: the server of another checkout of the project, e.g.
# `git worktree add /tmp/before main` (any commit to compare with).
#
# Each server starts on a free loopback port pinned to CPU 1; the load generator runs on CPU 0.
# A scenario CONNS:DEPTH:LEN has CONNS connections each send DEPTH lines of LEN bytes back to
# back and wait for the whole reply (checked byte for byte), over and over for SECS seconds; first
# batches are included. Payload rows 1:16:4096:CLASS send 64 KiB batches of one payload class of
# `tcp-upper-bench --payload` (the reply expected is tcp_upper's protocol: only for the servers
# whose name matches PAYLOAD_SERVERS).
#   SECS=3  SCENARIOS="1:1:14 100:1:14 10:64:14 4:16:4096 2000:1:14"
#   PAYLOADS="ascii spanish d-lines blank-start non-ascii near-miss word-in-line random-bytes"
#   PAYLOAD_SERVERS='^(tcp_upper|before)'  PYTHON=.venv/bin/python (else python3)
#   ROUNDS=1 (repeat everything, for a noisy machine: quote ratios of rows of one round)
# The load generator is benchmarks/loadgen.c (built with cc into benchmarks/build); without a C
# compiler it is tcp-upper-bench (Python: slower, so compare rows of one run only).
# Figures from one machine and one run are comparable with each other, not with another run's.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
build=$here/build
mkdir -p "$build"
secs=${SECS:-3}
scenarios=${SCENARIOS:-"1:1:14 100:1:14 10:64:14 4:16:4096 2000:1:14"}
payloads=${PAYLOADS-"ascii spanish d-lines blank-start non-ascii near-miss word-in-line random-bytes"}
payload_servers=${PAYLOAD_SERVERS:-'^(tcp_upper|before)'}

cc_found=""
if command -v cc >/dev/null; then
  cc_found=1
  for tool in loadgen upper_epoll; do
    [ "$build/$tool" -nt "$here/$tool.c" ] || cc -O2 -o "$build/$tool" "$here/$tool.c" || exit 2
  done
else
  echo "note: no C compiler (cc): no c_floor row, and tcp-upper-bench generates the load" >&2
fi
pin_srv=""; pin_gen=""
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  pin_srv="taskset -c 1"; pin_gen="taskset -c 0"
fi

if [ $# -eq 0 ]; then
  set --
  [ -n "$cc_found" ] && set -- "$@" c_floor="$build/upper_epoll {port}"
  set -- "$@" asyncio="$py $here/ref_asyncio.py {port}" \
    asyncio_proto="$py $here/ref_asyncio_proto.py {port}" \
    naive_sockserv="$py $here/ref_naive_threads.py {port}" \
    tcp_upper="env -C $root $py -m tcp_upper.server --host 127.0.0.1 --port {port}"
  [ -n "${BEFORE:-}" ] && \
    set -- "$@" before="env -C $BEFORE $py -m tcp_upper.server --host 127.0.0.1 --port {port}"
fi

# Payload batches and their expected replies, built once by the project's own payload code.
payload_dir=$(mktemp -d)
trap 'rm -rf "$payload_dir"' EXIT
declare -A payload_lines
for name in $payloads; do
  payload_lines[$name]=$(env -C "$root" "$py" "$here/payload_files.py" "$name" 16 4096 \
    "$payload_dir") || exit 2
done

free_port() {
  "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# load PORT CONNS DEPTH LEN [CLASS] -> "rps MBps p50 p99 max connect_s" or "FAIL(...)"
load() {
  local port=$1 c=$2 d=$3 l=$4 class=${5:-} out rc
  if [ -n "$cc_found" ]; then
    if [ -n "$class" ]; then
      out=$($pin_gen timeout $((secs + 30)) "$build/loadgen" 127.0.0.1 "$port" "$c" "$secs" \
        "$l" "${payload_lines[$class]}" "$payload_dir/$class.req" "$payload_dir/$class.rsp" 2>&1)
    else
      out=$($pin_gen timeout $((secs + 30)) "$build/loadgen" 127.0.0.1 "$port" "$c" "$secs" \
        "$l" "$d" 2>&1)
    fi
    rc=$?
    if [ $rc != 0 ]; then echo "FAIL(rc=$rc): $(tr '\n' ' ' <<<"$out" | cut -c1-120)"; return; fi
    get() { sed -n "s/.*[ ^]$1=\([^ ]*\).*/\1/p" <<<" $out" | head -1; }
    echo "$(get rps) $(get MBps) $(get p50_us) $(get p99_us) $(get max_us) $(get connect_s)"
  else
    out=$($pin_gen timeout $((secs + 60)) "$py" -m tcp_upper.bench --host 127.0.0.1 \
      --port "$port" --conns "$c" --depth "$d" --size "$l" --duration "$secs" \
      --payload "${class:-ascii}" --processes "$(( c > 100 ? 2 : 1 ))" --json 2>&1)
    rc=$?
    if [ $rc != 0 ]; then echo "FAIL(rc=$rc): $(tr '\n' ' ' <<<"$out" | cut -c1-120)"; return; fi
    "$py" -c 'import json, sys; d = json.loads(sys.stdin.read()); l = d["latency_us"]
print(round(d["requests_per_s"]), d["mb_per_s_sent"], l["p50"], l["p99"], l["max"], d["connect_s"])' <<<"$out"
  fi
}

row() {  # row NAME COMMAND SCENARIO [CLASS]
  local name=$1 cmd=$2 sc=$3 class=${4:-} c d l port log pid up result
  IFS=: read -r c d l _ <<<"$sc"
  port=$(free_port)
  log=$(mktemp)
  $pin_srv bash -c "exec ${cmd//\{port\}/$port}" >"$log" 2>&1 &
  pid=$!
  up=0
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { up=1; break; }
    sleep 0.05
  done
  if [ $up = 0 ]; then
    result="FAIL: server did not start: $(tail -c 200 "$log" | tr '\n' ' ')"
  else
    result=$(load "$port" "$c" "$d" "$l" "$class")
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -f "$log"
  case $result in
    FAIL*) printf '%-16s %-22s %s\n' "$name" "$sc" "$result" ;;
    *) read -r rps mbps p50 p99 max conn <<<"$result"
       printf '%-16s %-22s %10s %9s %9s %10s %10s %9s ok\n' "$name" "$sc" "$rps" "$mbps" \
         "$p50" "$p99" "$max" "$conn" ;;
  esac
}

printf '%-16s %-22s %10s %9s %9s %10s %10s %9s %s\n' server conns:depth:len req_per_s \
  MB_per_s p50_us p99_us max_us connect_s result
# Scenario by scenario, every server in turn: rows to compare run minutes apart at most.
for round in $(seq "${ROUNDS:-1}"); do
  [ "${ROUNDS:-1}" -gt 1 ] && echo "# round $round"
  for sc in $scenarios; do
    for spec in "$@"; do row "${spec%%=*}" "${spec#*=}" "$sc"; done
  done
  for class in $payloads; do
    for spec in "$@"; do
      name=${spec%%=*}
      [[ $name =~ $payload_servers ]] && row "$name" "${spec#*=}" "1:16:4096:$class" "$class"
    done
  done
done
