#!/usr/bin/env bash
# Checks that redis-server is on PATH before `make test`: the shared-store
# tests (store, server, the kvrecall package) start a real one through
# internal/redistest and fail without it. Exits 1 with a message that says
# how to install it. Tested by internal/redistest's TestRequireRedisScript.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "make test: redis-server is missing; the shared-store tests start a real one (sudo apt-get install redis-server, or run scripts/setup-build.sh as root)" >&2
    exit 1
fi
