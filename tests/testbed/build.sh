#!/usr/bin/env bash
# Builds (once) the test bed's components into target/testbed/, keyed by the wrapper
# modules' content so a version bump rebuilds and a warm cache costs nothing:
#   kube-apiserver, kube-controller-manager  from k8s.io/kubernetes (go/kube)
#   kube-scheduler, kubelet, kubectl          the node's parts, from the same module
#   pause                                     the node's sandbox process (go/pause, ours)
#   etcd                                      from go.etcd.io/etcd/server/v3 (go/etcd)
#   helm                                      from helm.sh/helm/v3 (go/helm), for the chart tests
#   promtool                                  from github.com/prometheus/prometheus (go/promtool),
#                                             for the chart's alert tests
#   crds/current/  cert-manager and ServiceMonitor CustomResourceDefinitions, copied from the
#                  modules github.com/cert-manager/cert-manager and
#                  github.com/prometheus-operator/prometheus-operator (only their CRDs: the
#                  chart's optional objects are validated against them)
# The Key Vault side is tests/testbed/kvstandin.py (python3 only): Lowkey Vault's app jar
# (com.github.nagyesta.lowkey-vault:lowkey-vault-app) is not served by this machine's Maven
# registry; see that file's header.
# `bed`: only what `testbed up` runs (etcd, the control plane, the node's parts); `all`
# adds helm and the CRDs (the chart tests also build what they use on demand).
# Prints nothing on a warm cache. Each binary is written to a temp name and renamed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${KVINJECT_TESTBED_CACHE:-$root/target/testbed}
mkdir -p "$out/bin"

KUBE_VERSION=v1.35.4

key() { cat "$@" | sha256sum | cut -c1-16; }

build_go() { # dir name pkg ldflags
  local dir=$1 name=$2 pkg=$3 ldflags=$4
  local k; k=$(key "$here/go/$dir/go.mod" "$here/go/$dir/go.sum")
  local dst="$out/bin/$name-$k"
  if [[ ! -x $dst ]]; then
    echo "testbed: building $name (cold build, takes minutes)" >&2
    (cd "$here/go/$dir" && CGO_ENABLED=0 go build -pgo=off -trimpath -ldflags "$ldflags" -o "$dst.tmp" "$pkg")
    mv "$dst.tmp" "$dst"
  fi
  ln -sfn "$(basename "$dst")" "$out/bin/$name"
}

kube_ldflags() {
  local v=$KUBE_VERSION minor; minor=${v#v1.}; minor=${minor%%.*}
  local p=k8s.io/component-base/version
  echo "-s -w -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z -X $p.gitCommit=0000000000000000000000000000000000000000"
}

CERT_MANAGER_VERSION=v1.21.2
PROMETHEUS_OPERATOR_VERSION=v0.85.0

module_dir() { # module@version -> its directory in the module cache
  (cd "$out" && go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
}

fetch_crds() {
  local dst="$out/crds/cm-$CERT_MANAGER_VERSION-po-$PROMETHEUS_OPERATOR_VERSION-rules"
  if [[ ! -d $dst ]]; then
    echo "testbed: fetching the cert-manager and ServiceMonitor CRDs" >&2
    local cm po
    cm=$(module_dir "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION")
    po=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")
    [[ -n $cm && -n $po ]] || { echo "testbed: could not download the CRD modules" >&2; exit 1; }
    rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
    cp "$cm"/deploy/crds/cert-manager.io_{certificates,certificaterequests,issuers,clusterissuers}.yaml "$dst.tmp/"
    cp "$po"/example/prometheus-operator-crd/monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml "$dst.tmp/"
    chmod -R u+w "$dst.tmp" && mv "$dst.tmp" "$dst"
  fi
  ln -sfn "$(basename "$dst")" "$out/crds/current"
}

helm_ldflags() {
  local v; v=$(awk '$1=="require" && $2=="helm.sh/helm/v3" {print $3}' "$here/go/helm/go.mod")
  echo "-s -w -X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
}

what=${1:-all}
case $what in
  etcd) build_go etcd etcd go.etcd.io/etcd/server/v3 "-s -w" ;;
  kube-apiserver) build_go kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$(kube_ldflags)" ;;
  kube-controller-manager) build_go kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$(kube_ldflags)" ;;
  kube-scheduler) build_go kube kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$(kube_ldflags)" ;;
  kubelet) build_go kube kubelet k8s.io/kubernetes/cmd/kubelet "$(kube_ldflags)" ;;
  kubectl) build_go kube kubectl k8s.io/kubernetes/cmd/kubectl "$(kube_ldflags)" ;;
  pause) build_go pause pause kvinject.test/pause "-s -w" ;;
  helm) build_go helm helm helm.sh/helm/v3/cmd/helm "$(helm_ldflags)" ;;
  promtool) build_go promtool promtool github.com/prometheus/prometheus/cmd/promtool "-s -w" ;;
  crds) fetch_crds ;;
  bed|all)
    build_go etcd etcd go.etcd.io/etcd/server/v3 "-s -w"
    if [[ $what == all ]]; then
      build_go helm helm helm.sh/helm/v3/cmd/helm "$(helm_ldflags)"
      fetch_crds
    fi
    build_go kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$(kube_ldflags)"
    build_go kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$(kube_ldflags)"
    build_go kube kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$(kube_ldflags)"
    build_go kube kubelet k8s.io/kubernetes/cmd/kubelet "$(kube_ldflags)"
    build_go kube kubectl k8s.io/kubernetes/cmd/kubectl "$(kube_ldflags)"
    build_go pause pause kvinject.test/pause "-s -w"
    ;;
  *) echo "usage: $0 [all|bed|etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kubectl|pause|helm|promtool|crds]" >&2; exit 2 ;;
esac
