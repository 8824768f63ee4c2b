#!/usr/bin/env bash
# Last step of `make demo`: run the verification suite on the test stage and say where the
# report is. The verdict decides the release (`safemail promote`), not this script: it fails
# only when no report could be written.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/safemail verify --stage test
rc=$?
report=reports/test/latest/report.json
if [ ! -f "$report" ]; then
  echo "error: the verification run wrote no report (exit $rc)" >&2
  exit 1
fi
verdict=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["verdict"])' "$report")
echo
echo "verification verdict: $verdict (safemail verify exit $rc)"
echo "report: $(readlink -f reports/test/latest)/report.html"
exit 0
