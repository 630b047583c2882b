#!/usr/bin/env bash
# Boot test: fieldllmd under a real systemd. A minimal Debian (debootstrap, cached outside the
# clone) is booted with systemd-nspawn; the built binary, the unit, sysusers file and the tiny
# model package are installed into a copy of it; then:
#   - the unit reaches active (running) only after the daemon's READY=1,
#   - a question over MQTT (the embedded broker, mosquitto_pub inside) gets its answer, and the
#     journal has it with structured fields (REQUEST_ID, TRANSPORT),
#   - a manual added by `fieldllmd docs add` as the service's user while the daemon runs (the
#     CLI's and the daemon's default index, the installed embedding model) answers a question
#     that asks for documents, with its sources, inside the unit's sandbox,
#   - SIGSTOP to the daemon leads to a watchdog restart,
#   - systemctl stop ends it cleanly within the stop timeout.
# Needs root, debootstrap and systemd-container (.ci/run installs them).
#
#   tests/boot/run.sh [FIELDLLMD_BIN]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=${1:-${FIELDLLMD_BIN:-$PWD/target/debug/fieldllmd}}
cache=${FIELDLLM_BOOT_CACHE:-/var/cache/fieldllm-boot}
model=models/build/smollm2-135m-instruct.gguf
embedder=models/build/all-minilm-l6-v2
[ -x "$bin" ] || { echo "boot test: no fieldllmd at $bin" >&2; exit 1; }
for m in "$model" "$embedder"; do
  [ -f "$m/manifest.toml" ] || { echo "boot test: no $m (models/setup.sh makes it)" >&2; exit 1; }
done

say() { echo "boot test: $*"; }
fail() { echo "boot test FAILED: $*" >&2; exit 1; }

# 1. the cached root: Debian bookworm with systemd and the MQTT clients
if [ ! -x "$cache/rootfs/usr/lib/systemd/systemd" ]; then
  say "debootstrap into $cache/rootfs (once; later runs reuse it)"
  mkdir -p "$cache"
  rm -rf "$cache/rootfs.tmp"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,mosquitto-clients \
    bookworm "$cache/rootfs.tmp" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log"; fail "debootstrap"; }
  mv "$cache/rootfs.tmp" "$cache/rootfs"
fi

# 2. a throwaway copy with fieldllm installed as a package would install it
work=$(mktemp -d /var/tmp/fieldllm-boot.XXXXXX)
root=$work/root
nspawn_pid=
cleanup() {
  [ -n "$nspawn_pid" ] && kill "$nspawn_pid" 2>/dev/null && wait "$nspawn_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
cp -a "$cache/rootfs" "$root"
install -D -m 0755 "$bin" "$root/usr/bin/fieldllmd"
install -D -m 0644 systemd/fieldllmd.service "$root/usr/lib/systemd/system/fieldllmd.service"
install -D -m 0644 systemd/fieldllm.sysusers "$root/usr/lib/sysusers.d/fieldllm.conf"
mkdir -p "$root/usr/share/fieldllm/models"
cp -a "$model" "$root/usr/share/fieldllm/models/smollm2-135m-instruct"
cp -a "$embedder" "$root/usr/share/fieldllm/models/all-minilm-l6-v2"
install -D -m 0644 tests/corpus/hpu-220-service-manual.md \
  "$root/usr/share/doc/fieldllm/manuals/hpu-220-service-manual.md"
install -d -m 0755 "$root/etc/fieldllm"
cat >"$root/etc/fieldllm/fieldllmd.toml" <<'TOML'
[model]
path = "/usr/share/fieldllm/models/smollm2-135m-instruct"
threads = 1

[limits]
max_tokens = 16
grace_s = 5
TOML
# a shorter watchdog than the shipped 30 s, so the SIGSTOP check takes seconds
install -d "$root/etc/systemd/system/fieldllmd.service.d"
printf '[Service]\nWatchdogSec=4\n' >"$root/etc/systemd/system/fieldllmd.service.d/boot-test.conf"
ln -s /usr/lib/systemd/system/fieldllmd.service \
  "$root/etc/systemd/system/multi-user.target.wants/fieldllmd.service"

# 3. boot it
say "booting $root"
systemd-nspawn -D "$root" -b --register=no --keep-unit -M fieldllm-boot \
  --console=read-only >"$work/console.log" 2>&1 &
nspawn_pid=$!
# the container's PID 1: the systemd among nspawn's children or grandchildren
find_init() {
  local p q
  for p in $(pgrep -P "$nspawn_pid" || true); do
    for q in "$p" $(pgrep -P "$p" || true); do
      [ "$(cat "/proc/$q/comm" 2>/dev/null)" = systemd ] && { echo "$q"; return; }
    done
  done
  true
}
init=
for _ in $(seq 100); do
  init=$(find_init)
  [ -n "$init" ] && break
  sleep 0.1
done
[ -n "$init" ] || fail "no container init"
inside() { nsenter -t "$init" -m -u -i -n -p -- "$@"; }
prop() { inside systemctl show -P "$1" fieldllmd; }
for _ in $(seq 120); do
  inside systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded' && break
  sleep 0.5
done
inside systemctl is-system-running 2>/dev/null | grep -qE 'running|degraded' \
  || fail "the container's systemd did not finish booting: $(inside systemctl is-system-running 2>&1)"

# 4. active (running) only after READY
for _ in $(seq 120); do
  [ "$(prop SubState)" = running ] && break
  sleep 0.5
done
[ "$(prop ActiveState)/$(prop SubState)" = active/running ] \
  || { inside journalctl -u fieldllmd --no-pager | tail -30; fail "not active (running)"; }
active_at=$(prop ActiveEnterTimestampMonotonic)
ready_at=$(inside journalctl -u fieldllmd -o json --no-pager | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if e.get("MESSAGE") == "serving":
        print(e["__MONOTONIC_TIMESTAMP"]); break')
[ -n "$ready_at" ] || fail "no \"serving\" line in the journal"
# journald stamps a stdout line when it reads it from the stream, which can be after systemd
# has handled the READY=1 the daemon sent just after writing the line (CI saw the stamp 303 us
# after the unit went active). So: active no earlier than LAG before that stamp, and that stamp
# far enough after the daemon's start (the model load) that a unit active at start (not
# waiting for READY) would fail the first check.
lag=100000
exec_at=$(prop ExecMainStartTimestampMonotonic)
[ $(( ready_at - exec_at )) -gt $(( 2 * lag )) ] \
  || fail "READY logged $(( ready_at - exec_at )) us after the start: too soon to tell active-at-READY from active-at-start"
[ $(( active_at + lag )) -ge "$ready_at" ] || fail "active at $active_at us, before READY at $ready_at us"
say "active (running) $(( active_at - ready_at )) us after the daemon's READY line reached the journal, $(( ready_at - exec_at )) us after its start"
inside systemctl status fieldllmd --no-pager | sed -n '1,4p;/Status:/p'
inside systemctl show -P StatusText fieldllmd | grep -q 'thermal' || fail "no STATUS= line"

# 5. a question over MQTT, and the journal's structured fields
# no node_id in the config: the node is the hostname (nspawn's -M), read by uname(2) since
# the unit hides /proc/sys
# the subscriber is live once a probe it subscribed to comes back: then the question goes out
inside sh -c 'node=$(uname -n); timeout 30 mosquitto_sub -h 127.0.0.1 -t "fieldllm/v1/$node/resp/q1" -t boot/probe -v > /tmp/answer &
  for i in $(seq 100); do mosquitto_pub -h 127.0.0.1 -t boot/probe -m live; grep -q "^boot/probe" /tmp/answer && break; sleep 0.1; done
  mosquitto_pub -h 127.0.0.1 -t fieldllm/v1/$node/req -m "{\"id\":\"q1\",\"prompt\":\"pump\",\"maxTokens\":8}";
  for i in $(seq 100); do grep -q "\"done\"" /tmp/answer && break; sleep 0.2; done; cat /tmp/answer' \
  >"$work/answer"
grep -q '"done"' "$work/answer" || { cat "$work/answer"; fail "no answer over MQTT"; }
say "answered over MQTT: $(grep -c chunk "$work/answer") chunks and a done"
inside journalctl -u fieldllmd REQUEST_ID=q1 TRANSPORT=mqtt --no-pager -o cat | grep -q . \
  || fail "the journal has no entry with REQUEST_ID=q1 TRANSPORT=mqtt"

# 5b. documents: the index does not exist at start; `docs add` as the service's user makes it
# (the CLI's default index is the daemon's, the embedding model the installed one), and the
# running daemon answers from it, citing it
inside runuser -u fieldllm -- fieldllmd docs add /usr/share/doc/fieldllm/manuals >"$work/docs-add" 2>&1 \
  || { cat "$work/docs-add"; fail "docs add as the fieldllm user"; }
inside sh -c 'node=$(uname -n); timeout 60 mosquitto_sub -h 127.0.0.1 -t "fieldllm/v1/$node/resp/q2" -t boot/probe2 -v > /tmp/grounded &
  for i in $(seq 100); do mosquitto_pub -h 127.0.0.1 -t boot/probe2 -m live; grep -q "^boot/probe2" /tmp/grounded && break; sleep 0.1; done
  mosquitto_pub -h 127.0.0.1 -t fieldllm/v1/$node/req -m "{\"id\":\"q2\",\"prompt\":\"What is the setting of the main relief valve?\",\"docs\":true,\"maxTokens\":8}";
  for i in $(seq 250); do grep -qE "\"(done|error)\"" /tmp/grounded && break; sleep 0.2; done; cat /tmp/grounded' \
  >"$work/grounded"
grep -q '"sources":\[{"doc":"hpu-220-service-manual.md"' "$work/grounded" \
  || { cat "$work/grounded"; inside journalctl -u fieldllmd --no-pager | tail -20; fail "no grounded answer citing the manual"; }
say "answered from the manual added while it ran: $(grep -o '"quote":"[^"]*"' "$work/grounded")"

# 6. SIGSTOP: the watchdog restarts it
pid=$(prop MainPID)
inside systemctl kill --kill-whom=main --signal=SIGSTOP fieldllmd
say "SIGSTOP to $pid"
for _ in $(seq 60); do
  [ "$(prop NRestarts)" -ge 1 ] && [ "$(prop SubState)" = running ] && break
  sleep 0.5
done
[ "$(prop NRestarts)" -ge 1 ] || fail "no restart after SIGSTOP"
[ "$(prop MainPID)" != "$pid" ] || fail "same process after the restart"
inside journalctl -u fieldllmd --no-pager | grep -q 'Watchdog timeout' || fail "not a watchdog restart"
say "watchdog restart: new pid $(prop MainPID), NRestarts $(prop NRestarts)"

# 7. systemctl stop: clean, within the stop timeout
start=$(date +%s%N)
inside systemctl stop fieldllmd
took=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$(prop Result)" = success ] || fail "stop result $(prop Result)"
[ "$(prop ExecMainStatus)" = 0 ] || fail "exit status $(prop ExecMainStatus)"
say "systemctl stop took $took ms (TimeoutStopSec=30 s); exit status 0"
inside systemctl poweroff || true
wait "$nspawn_pid" 2>/dev/null || true
nspawn_pid=
say "passed"
