#!/usr/bin/env bash
# The long fuzz: every target of host/src/fuzz.rs for MINUTES each (default 10), two at a time, at
# low priority, in child processes under a memory and time bound (host/src/bin/stuffed-fuzz.rs).
# Stops and resumes by case number: the next case of each target is kept in target/fuzz/state.json,
# so interrupting it (Ctrl-C) and running it again goes on where it was. Every case's number is
# logged before it runs (target/fuzz/cases.log); failures are printed at the end, each with the
# command that reproduces it; each failing case's input is kept in target/fuzz/failures. Built with
# the test profile: optimized, with overflow checks.
#   tools/fuzz.sh [MINUTES] [extra stuffed-fuzz run flags, e.g. --targets torch-zip,pickle]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
shift || true
cargo build --profile test -p stuffed --bin stuffed-fuzz
mkdir -p target/fuzz
exec nice -n 10 target/debug/stuffed-fuzz run --minutes "$minutes" --jobs 2 \
    --state target/fuzz/state.json --log target/fuzz/cases.log --keep target/fuzz/failures "$@"
