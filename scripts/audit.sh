#!/usr/bin/env bash
# Security audit (run by `make audit`):
#   1. pip-audit: known vulnerabilities in the packages installed in $VENV (nilai itself skipped).
#      It needs the vulnerability database online. When that cannot be reached, it says so and
#      does not fail for that reason alone; it fails when vulnerabilities are found.
#   2. bandit: static checks of src/; any issue of high severity fails. Always runs.
#
# Environment: VENV (default .venv); PIP_AUDIT_ARGS adds pip-audit options (e.g. "-s osv").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
status=0

report="$(mktemp)"
errors="$(mktemp)"
trap 'rm -f -- "$report" "$errors"' EXIT

printf '==> pip-audit (packages installed in %s, editable nilai skipped)\n' "$VENV"
pip_audit_rc=0
# shellcheck disable=SC2086  # PIP_AUDIT_ARGS is a list of options
"$VENV/bin/pip-audit" --skip-editable --progress-spinner off --timeout 15 \
    --format json --output "$report" ${PIP_AUDIT_ARGS:-} 2>"$errors" || pip_audit_rc=$?

"$VENV/bin/python" - "$pip_audit_rc" "$report" "$errors" <<'EOF' || status=1
"""Judge pip-audit's JSON report; exit 1 only for vulnerabilities or unexpected errors."""

import json
import re
import sys
from pathlib import Path

rc = int(sys.argv[1])
report_text = Path(sys.argv[2]).read_text(errors="replace").strip()
errors = Path(sys.argv[3]).read_text(errors="replace")
UNREACHED = "pip-audit: the vulnerability database could not be reached;"
NETWORK = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|Could not connect|Max retries exceeded"
    r"|NameResolutionError|Failed to establish a new connection|Name or service not known"
    r"|Temporary failure in name resolution|network may be blocking|ProxyError|SSLError"
    r"|RemoteDisconnected|ServiceError"
)

try:
    dependencies = json.loads(report_text)["dependencies"] if report_text else None
except (ValueError, KeyError, TypeError):
    dependencies = None

if dependencies is None:
    if rc != 0 and NETWORK.search(errors):
        last = [line for line in errors.splitlines() if line.strip()][-1:]
        print(f"{UNREACHED} dependencies were NOT checked for known vulnerabilities.")
        print(f"  ({last[0].strip() if last else 'network error'})")
        sys.exit(0)
    sys.stdout.write(errors)
    print(f"pip-audit failed (exit {rc}) without a report.")
    sys.exit(1)

vulnerable = [dep for dep in dependencies if dep.get("vulns")]
skipped = [dep for dep in dependencies if "skip_reason" in dep]
audited = len(dependencies) - len(skipped)

if vulnerable:
    count = sum(len(dep["vulns"]) for dep in vulnerable)
    print(f"pip-audit: {count} known vulnerabilities in {len(vulnerable)} packages:")
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            print(f"  {dep['name']} {dep.get('version', '?')}: {vuln['id']} (fixed in: {fixes})")
    sys.exit(1)

if rc != 0:
    sys.stdout.write(errors)
    print(f"pip-audit failed (exit {rc}).")
    sys.exit(1)

if dependencies and audited == 0:
    print(
        f"{UNREACHED} it returned no data for any of the {len(dependencies)} installed "
        "packages, so they were NOT checked for known vulnerabilities."
    )
    print(f"  (e.g. {skipped[0]['skip_reason']})")
    sys.exit(0)

print(f"pip-audit: no known vulnerabilities in {audited} audited packages.")
if skipped:
    names = ", ".join(dep["name"] for dep in skipped)
    print(f"  {len(skipped)} packages could not be audited (not checked): {names}")
EOF

printf '==> bandit (src/, failing on high severity)\n'
if "$VENV/bin/bandit" -r src --severity-level high --quiet; then
    echo "bandit: no high-severity issues in src/."
else
    echo "bandit: high-severity issues found (see above)."
    status=1
fi

exit "$status"
