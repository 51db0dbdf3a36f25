#!/usr/bin/env bash
# Start the Transformers-backend server with builtin://tiny-vl (blocks; Ctrl-C stops it cleanly).
# Create a key first:  twinkle-server keys create --user "$USER" -c "$(dirname "$0")/server_config.yaml"
set -euo pipefail
exec twinkle-server launch -c "$(dirname "$0")/server_config.yaml" "$@"
