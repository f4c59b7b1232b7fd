#!/usr/bin/env bash
# Three hosts on this machine (network namespaces on a bridge): Kafka on host1, the Ray head on host2,
# a Ray worker with a GPU on host3. Needs root. Usage: scripts/lab.sh up|down|status|exec HOST -- CMD...
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python cli.py lab "$@"
