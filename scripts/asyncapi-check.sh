#!/usr/bin/env bash
# Validates the AsyncAPI document of the messages (what GET /asyncapi.json
# serves, printed by `prereg asyncapi`) with the AsyncAPI parser from the npm
# registry (@asyncapi/parser, installed into target/asyncapi-node/), and
# fails on any error it reports. Also checks that every job type the binary
# knows (jobs::CONTRACTS, listed by the Rust test
# asyncapi::tests::every_job_type_is_described_on_its_exchange) and the
# SPEC's events are in it.
#
#   bash scripts/asyncapi-check.sh            # generates it with cargo run
#   bash scripts/asyncapi-check.sh FILE.json  # checks a saved document
#   ASYNCAPI_URL=http://127.0.0.1:8080/asyncapi.json bash scripts/asyncapi-check.sh
#
# Needs node (18+) and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

PARSER_VERSION="${ASYNCAPI_PARSER_VERSION:-3.6.3}"
NODE_DIR="target/asyncapi-node"
DOC="target/asyncapi.json"

die() { echo "asyncapi-check: ERROR: $*" >&2; exit 1; }

command -v node >/dev/null 2>&1 || die "node not found (Debian: apt-get install -y nodejs npm)"
command -v npm >/dev/null 2>&1 || die "npm not found (Debian: apt-get install -y npm)"

mkdir -p target
if [ "${1:-}" != "" ]; then
  cp "$1" "$DOC"
elif [ "${ASYNCAPI_URL:-}" != "" ]; then
  curl -fsS "$ASYNCAPI_URL" -o "$DOC" || die "cannot fetch $ASYNCAPI_URL"
else
  # The document needs no service: only the broker prefix is read.
  cargo run --quiet --locked --bin prereg -- asyncapi > "$DOC" \
    || die "prereg asyncapi failed"
fi

if [ ! -f "$NODE_DIR/node_modules/@asyncapi/parser/package.json" ] \
  || ! grep -q "\"version\": \"$PARSER_VERSION\"" "$NODE_DIR/node_modules/@asyncapi/parser/package.json"; then
  echo "installing @asyncapi/parser@$PARSER_VERSION into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error \
    "@asyncapi/parser@$PARSER_VERSION" </dev/null >&2 \
    || die "npm install @asyncapi/parser@$PARSER_VERSION failed"
fi

NODE_PATH="$NODE_DIR/node_modules" node - "$DOC" <<'JS'
const fs = require('fs');
const { Parser } = require('@asyncapi/parser');

(async () => {
  const file = process.argv[2];
  const text = fs.readFileSync(file, 'utf8');
  const { document, diagnostics } = await new Parser().parse(text, { source: file });
  // Severity: 0 error, 1 warning, 2 information, 3 hint.
  const errors = diagnostics.filter((d) => d.severity === 0);
  for (const d of diagnostics.filter((d) => d.severity === 1)) {
    console.error(`warning: ${d.code}: ${d.message} at /${(d.path || []).join('/')}`);
  }
  for (const d of errors) {
    console.error(`error: ${d.code}: ${d.message} at /${(d.path || []).join('/')}`);
  }
  if (errors.length > 0 || !document) {
    console.error(`asyncapi-check: ${errors.length} error(s) in ${file}`);
    process.exit(1);
  }
  const names = new Set(document.allMessages().all().map((m) => m.name()));
  // The SPEC's commands and events (SPEC §6); the Rust tests check the
  // code's full list of job and event types against the same document.
  const expected = [
    'preregistration.requested', 'invitation.requested', 'review.requested',
    'association.requested', 'account.upserted', 'sweep.requested', 'export.requested',
    'preregistration.accepted', 'preregistration.rejected', 'preregistration.expired',
    'preregistration.deleted', 'review.submitted', 'review.decided', 'review.overdue',
    'invitation.sent', 'invitation.failed', 'invitation.expired',
    'association.succeeded', 'association.failed', 'export.completed',
  ];
  const missing = expected.filter((t) => !names.has(t));
  if (missing.length > 0) {
    console.error(`asyncapi-check: missing message types: ${missing.join(', ')}`);
    process.exit(1);
  }
  for (const m of document.allMessages().all()) {
    if (!m.hasPayload() || m.examples().length === 0) {
      console.error(`asyncapi-check: ${m.name()} has no payload schema or no example`);
      process.exit(1);
    }
  }
  console.log(
    `asyncapi-check: ${file} is a valid AsyncAPI ${document.version()} document: ` +
      `${document.channels().length} channels, ${document.operations().length} operations, ` +
      `${names.size} message types`,
  );
})().catch((e) => {
  console.error(`asyncapi-check: ${e.stack || e}`);
  process.exit(1);
});
JS
