#!/usr/bin/env bash
# Build (or reuse) a real Kubernetes control plane for the integration tests.
#
#   scripts/k8s/ensure-binaries.sh [OUT_DIR]
#
# OUT_DIR defaults to $HETEROSCALE_KUBE_BIN, else /root/.cache/heteroscale/kube-bin.
# Quick and silent when kube-apiserver, kube-controller-manager, kube-scheduler and
# etcd are already there (the CI calls it before every pytest run).
#
# Why a source build: there is no Docker (no kind), and no downloads beyond the Debian
# archive. Debian bookworm ships the Kubernetes v1.20.2 source in its `kubernetes`
# source package and etcd 3.4 as `etcd-server`; Debian's Go builds it with `make`
# (plain `go build` fails). The vendored modern-go/reflect2 1.0.1 crashes
# json-iterator at run time under Go >= 1.18, so it is swapped for Debian's 1.0.2.
# Cold: about 5.5 minutes and 2.3 GB of temporary disk.
set -euo pipefail

OUT=${1:-${HETEROSCALE_KUBE_BIN:-/root/.cache/heteroscale/kube-bin}}
TOOLS=(kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
  command -v etcd >/dev/null 2>&1 || return 1
  for t in "${TOOLS[@]}"; do [ -x "$OUT/$t" ] || return 1; done
}

have_all && exit 0

mkdir -p "$OUT"
# One build at a time per OUT_DIR (parallel CI jobs or test sessions).
exec 9>"$OUT/.build.lock"
flock 9
have_all && exit 0

export DEBIAN_FRONTEND=noninteractive
echo "ensure-binaries: building Kubernetes v1.20.2 into $OUT (about 5.5 minutes cold)" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends golang-go golang-github-modern-go-reflect2-dev \
  etcd-server rsync make openssl curl ca-certificates >/dev/null

missing=()
for t in "${TOOLS[@]}"; do [ -x "$OUT/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi   # only etcd was missing

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# A private apt configuration that only knows the deb-src entries, so the system's
# lists stay untouched.
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/parts"
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$WORK/apt/parts/src.sources"
APTO=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$WORK/apt/parts"
      -o Dir::State::Lists="$WORK/apt/lists")
apt-get "${APTO[@]}" update -qq
(cd "$WORK" && apt-get "${APTO[@]}" source --download-only -qq kubernetes >/dev/null 2>&1)
tar xzf "$WORK"/kubernetes_*.orig.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/kubernetes-1.20*/)
rm -rf "$SRC/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$SRC/vendor/github.com/modern-go/reflect2"

WHAT=""
for t in "${missing[@]}"; do WHAT="$WHAT cmd/$t"; done
(cd "$SRC" && env -u GOPATH -u GO111MODULE KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean \
  GOCACHE="$WORK/gocache" make WHAT="${WHAT# }" >/dev/null)
for t in "${missing[@]}"; do
  cp "$SRC/_output/bin/$t" "$OUT/$t.tmp" && mv "$OUT/$t.tmp" "$OUT/$t"   # atomic: never a half file
done
"$OUT/kube-apiserver" --version >&2
