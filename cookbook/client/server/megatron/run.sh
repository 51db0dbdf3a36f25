#!/usr/bin/env bash
# Start the Megatron-backend server (blocks; Ctrl-C stops it cleanly).
set -euo pipefail
exec twinkle-server launch -c "$(dirname "$0")/server_config.yaml" "$@"
