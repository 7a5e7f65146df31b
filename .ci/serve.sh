# Sourced by the CI scripts. start_vigil BINARY LOG [ARGS…] starts `BINARY serve` on an
# ephemeral loopback port with ARGS, its log in LOG, and returns once it prints its
# "listening on" line (it binds only when its models are warm): sets SERVER (the pid) and
# ADDR (host:port). Fails, showing the log, if the server exits or 5 minutes pass.
start_vigil() {
  local bin=$1 log=$2
  shift 2
  "$bin" serve --listen 127.0.0.1:0 "$@" 2> "$log" &
  SERVER=$!
  for _ in $(seq 1 600); do
    ADDR=$(grep -o 'listening on http://[0-9.:]*' "$log" | head -n 1 | sed 's#listening on http://##' || true)
    [ -n "$ADDR" ] && return 0
    kill -0 "$SERVER" 2>/dev/null || { cat "$log"; return 1; }
    sleep 0.5
  done
  cat "$log"
  return 1
}
