#!/usr/bin/env bash
# CI check of the README's quick start: runs scripts/dev.sh on this clone,
# waits for /readyz, pre-registers through the API with the printed partner
# key, waits for the decision, invites the customer, finds the caught
# invitation email, then stops it (SIGTERM) and checks it exits cleanly.
# Uses its own database, broker prefix, port and mail directory, and removes
# them afterwards (prereg dev --cleanup-on-exit), so it can share services.
set -euo pipefail
cd "$(dirname "$0")/.."

WAIT_SECS="${QUICKSTART_WAIT_SECS:-1200}"   # includes the first build
log() { echo "quickstart-check: $*"; }
die() { echo "quickstart-check: ERROR: $*" >&2; [ -f "${OUT:-}" ] && tail -n 40 "$OUT" >&2; exit 1; }

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
WORK="$(mktemp -d)"
OUT="$WORK/dev.out"
RUN_ID="qs$$$(date +%s)"
export PREREG_HTTP_ADDR="127.0.0.1:$PORT"
export PREREG_PUBLIC_URL="$BASE"
export PREREG_DATABASE_URL="${PREREG_QUICKSTART_PG:-postgres://postgres@127.0.0.1:5432}/prereg_$RUN_ID"
export PREREG_AMQP_PREFIX="$RUN_ID"
# A throwaway prefix: its queues go once unused, even if this run is killed.
export PREREG_AMQP_QUEUE_EXPIRES=15m
unset PREREG_SMTP_URL PREREG_OPERATOR_TOKEN

PID=""
cleanup() {
  # The whole group: during the build, cargo runs under dev.sh.
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill -TERM -- "-$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

log "starting scripts/dev.sh on $BASE (output in $OUT)"
setsid bash scripts/dev.sh --mail-dir "$WORK/mail" --cleanup-on-exit >"$OUT" 2>&1 &
PID=$!

deadline=$((SECONDS + WAIT_SECS))
until curl -fsS "$BASE/readyz" >/dev/null 2>&1 && grep -q '^  partner key' "$OUT"; do
  kill -0 "$PID" 2>/dev/null || die "scripts/dev.sh exited before it was ready"
  [ "$SECONDS" -lt "$deadline" ] || die "not ready within ${WAIT_SECS}s"
  sleep 2
done
log "ready: $(curl -fsS "$BASE/readyz")"
key() { sed -n "s/^  $1 *//p" "$OUT" | head -n1 | awk '{print $1}'; }
PARTNER_KEY="$(key 'partner key')"
[ -n "$PARTNER_KEY" ] || die "no partner key printed"

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
api() { curl -fsS -H "Authorization: Bearer $PARTNER_KEY" -H 'Content-Type: application/json' "$@"; }

ID="$(api -X POST "$BASE/v1/preregistrations" \
  -d '{"full_name": "Zhang San", "email": "zhang.san@customer.example", "mobile": "+8613800138000"}' | json "['id']")"
log "pre-registration $ID accepted"
STATUS=queued
for _ in $(seq 1 150); do
  STATUS="$(api "$BASE/v1/preregistrations/$ID" | json "['status']")"
  [ "$STATUS" != queued ] && break
  sleep 0.2
done
[ "$STATUS" = preregistered ] || die "pre-registration $ID ended '$STATUS', not preregistered"
log "decided: $STATUS"

api -X POST "$BASE/v1/invitations" -d "{\"preregistration_ids\": [\"$ID\"], \"locale\": \"en\"}" >/dev/null
for _ in $(seq 1 150); do
  if grep -l "$BASE/i/" "$WORK"/mail/*.eml >/dev/null 2>&1; then break; fi
  sleep 0.2
done
MAIL="$(grep -l "$BASE/i/" "$WORK"/mail/*.eml 2>/dev/null | head -n1)" || true
[ -n "$MAIL" ] || die "no invitation email caught in $WORK/mail"
grep -qi '^To: .*zhang.san@customer.example' "$MAIL" || die "the caught email is not addressed to the customer"
log "invitation email caught: $(basename "$MAIL")"

kill -TERM "$PID"
for _ in $(seq 1 60); do kill -0 "$PID" 2>/dev/null || break; sleep 0.5; done
kill -0 "$PID" 2>/dev/null && die "prereg dev did not stop within 30s of SIGTERM"
wait "$PID" || die "prereg dev exited with an error after SIGTERM"
PID=""
log "stopped cleanly; quick start OK"
