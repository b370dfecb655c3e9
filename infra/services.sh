#!/usr/bin/env bash
# Start / check / stop the local services (PostgreSQL-backed MLflow server, Prefect server, work pool + worker).
#   infra/services.sh start|status|stop|env [--backend auto|postgres|sqlite] [--host 127.0.0.1] [--no-ui]
#   source infra/.state/env   # then `mrt` and the flows talk to them (MLFLOW_TRACKING_URI, PREFECT_API_URL)
# The work is done by infra/services.py (health checks with deadlines, process groups, the state file).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py="$(command -v python3)"; fi
fi
exec "$py" "$here/services.py" "$@"
