#!/usr/bin/env bash
# Start a private Kafka broker for the test session, run pytest against it, always stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.cache/test-kafka
PORT=${VAPIPE_TEST_PORT:-19092}
test_broker() {
  VAPIPE_BROKER__STATE_DIR=$STATE VAPIPE_BROKER__PORT=$PORT VAPIPE_BROKER__CONTROLLER_PORT=$((PORT + 1)) \
    VAPIPE_BROKER__HEAP=512m .venv/bin/vapipe kafka "$@"
}
test_broker stop >/dev/null || true  # a broker left by an interrupted session
rm -rf "$STATE/data"                  # every test session starts from an empty broker
trap 'test_broker stop || true' EXIT
test_broker start
export VAPIPE_TEST_BOOTSTRAP=127.0.0.1:$PORT
export RAY_USAGE_STATS_ENABLED=0
# Two workers: most of a pipeline test is waiting (broker, group joins, sessions), so two overlap
# well even on two cores. Each worker has its own Ray; --dist loadfile keeps a file's module
# fixtures (the chaos reference run) in one worker. VAPIPE_TEST_WORKERS=0 runs in one process.
WORKERS=${VAPIPE_TEST_WORKERS:-2}
PARALLEL=()
if [ "$WORKERS" != 0 ]; then PARALLEL=(-n "$WORKERS" --dist loadfile); fi
# pytest exits 5 when it collected nothing: with set -e that fails the run, as it should.
.venv/bin/python -m pytest --durations=25 "${PARALLEL[@]}" "$@"
