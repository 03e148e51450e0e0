#!/usr/bin/env bash
# An environment for hydra/launcher=ray_cluster beside the project's own: hydra-ray-launcher 1.2.2 needs
# cloudpickle<3 (the project's environment has cloudpickle 3, through MLflow), so ray, the launcher and
# cloudpickle 2 go into a venv of their own that sees every other package (torch included) of the project's
# venv through a .pth file, instead of installing them a second time.
#   scripts/ray-venv.sh [BASE_VENV=.venv] [RAY_VENV=.cache/ray-venv]   (idempotent; prints RAY_VENV's python)
set -euo pipefail
BASE="${1:-.venv}"
OUT="${2:-.cache/ray-venv}"
SPEC="hydra-ray-launcher==1.2.2"

[ -x "$BASE/bin/python" ] || { echo "error: no Python environment at $BASE: run 'make setup' first" >&2; exit 1; }
if [ ! -f "$OUT/.installed" ] || [ "$(cat "$OUT/.installed")" != "$SPEC" ]; then
    base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$BASE/bin/python" -m venv --system-site-packages "$OUT"
    own_site=$("$OUT/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # After this venv's own packages (so cloudpickle 2 wins), before the system's.
    echo "import site; site.addsitedir('$(realpath "$base_site")')" > "$own_site/zz-orpolab-base-venv.pth"
    "$OUT/bin/pip" install -q --disable-pip-version-check "$SPEC"
    echo "$SPEC" > "$OUT/.installed"
fi
echo "$OUT/bin/python"
