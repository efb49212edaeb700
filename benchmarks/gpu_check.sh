#!/usr/bin/env bash
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
