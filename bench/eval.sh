#!/usr/bin/env bash
# Measures the shipped policy pack on ../shared/corpus and prints the table with its targets.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/eval.py "$@"
