# Helpers the benchmark scripts source (`. tests/bench/lib.sh` from the repository root).

# A free TCP port on loopback (bound, read, released).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_log FILE NEEDLE SECONDS: returns once FILE holds NEEDLE (grep pattern); after SECONDS,
# prints FILE and exits 1.
wait_log() {
  for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no '$2' in $1" >&2; cat "$1" >&2; exit 1
}
