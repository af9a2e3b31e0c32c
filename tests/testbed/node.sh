# The test bed's node: a kube-scheduler, a kubelet and containerd (Debian's containerd and
# runc), so pods really run. Sourced by tests/testbed/testbed, which defines run, cache,
# start, alive, wait_for, stop_one, log and die.
#
# What this machine needs (../shared/node-notes.md has the errors behind each):
# - cgroup v1 only: the kubelet runs with failCgroupV1: false;
# - no CAP_SYS_RESOURCE: containerd clamps oom_score_adj (restrict_oom_score_adj), else runc
#   fails with "can't get final child's PID from pipe: EOF";
# - a loopback node IP is refused: the node's address is a /32 on lo (NODE_IP), removed by
#   `down`; the kubelet listens only there;
# - makeIPTablesUtilChains: false, so the host's iptables stay untouched.
#
# The node is registered with the taint kvinject.test/node=real:NoSchedule: only pods that
# tolerate it (the real-node tests, the chart's pods on the bed) run there. Every other
# test's pods stay Pending, as they were on a bed without a node, and those tests report
# them Ready by hand (tests/support ReadyPods): they test admission and rollouts, not
# containers, and their images (registry.invalid/...) do not exist.
#
# Pods use hostNetwork (there is no kube-proxy): they reach the bed's vault and apiserver
# on 127.0.0.1. The apiserver reaches webhooks behind a Service through the Service's
# endpoints (--enable-aggregator-routing), since no proxy serves Service IPs.
#
# Host state the node changes, all put back by `down` (also after kill -9, from the record
# in $run/node-host-state written before anything changed): sysctls the kubelet and the
# bridge plugin set (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops,
# net.ipv4.ip_forward); fixed paths (/var/lib/kubelet, /var/log/containers, /var/lib/cni,
# /run/containerd); the cgroups under each hierarchy's kvinject-bed/; the bridge kvbed0; the
# /32 on lo; mounts under $run. One node per machine: a second bed runs without one.

NODE_NAME=kvinject-bed-node
NODE_IP=10.244.76.1
NODE_TAINT=kvinject.test/node=real:NoSchedule
NODE_BRIDGE=kvbed0
NODE_SUBNET=10.244.77.0/24
NODE_CGROUP=kvinject-bed
NODE_LOCK=/run/kvinject-testbed-node
NODE_SYSCTLS="vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward"
NODE_PATHS="/var/lib/kubelet /var/log/containers /var/lib/cni /run/containerd"
# The bed's images, imported into containerd's k8s.io namespace.
PAUSE_IMAGE=localhost/pause:bed
BUSYBOX_IMAGE=localhost/busybox:bed
KVINJECT_IMAGE=localhost/kvinject:bed

node_wanted() {
  [[ ${KVINJECT_TESTBED_NODE:-1} != 0 ]] || return 1
  if [[ $(id -u) != 0 ]]; then log "no node: it needs root (KVINJECT_TESTBED_NODE=0 skips it quietly)"; return 1; fi
  command -v containerd >/dev/null && command -v runc >/dev/null && command -v umoci >/dev/null &&
    [[ -x /usr/lib/cni/bridge && -x /bin/busybox ]] ||
    die "the node needs Debian's containerd runc containernetworking-plugins busybox-static umoci (apt-get install them, or KVINJECT_TESTBED_NODE=0)"
  if [[ -f $NODE_LOCK/owner && $(cat "$NODE_LOCK/owner") != "$run" && -d $(cat "$NODE_LOCK/owner") ]]; then
    log "no node: the bed in $(cat "$NODE_LOCK/owner") runs this machine's node"
    return 1
  fi
  return 0
}

node_certs() {
  local d=$run/pki
  leaf kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" "DNS:$NODE_NAME" clientAuth
  leaf kubelet-serving "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME" serverAuth
  local b64="base64 -w0"
  cat >"$run/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: https://127.0.0.1:$(cat "$run/apiserver.port")
    certificate-authority-data: $($b64 "$d/ca.crt")
users:
- name: kubelet
  user:
    client-certificate-data: $($b64 "$d/kubelet-client.crt")
    client-key-data: $($b64 "$d/kubelet-client.key")
contexts:
- name: testbed
  context: {cluster: testbed, user: kubelet}
current-context: testbed
EOF
}

# Records, before anything changes, what `down` must put back.
node_save_host_state() {
  local s=$run/node-host-state k p
  : >"$s.tmp"
  for k in $NODE_SYSCTLS; do echo "sysctl $k $(sysctl -n "$k")" >>"$s.tmp"; done
  for p in $NODE_PATHS; do [[ -e $p ]] || echo "path $p" >>"$s.tmp"; done
  mv "$s.tmp" "$s"
  mkdir -p "$NODE_LOCK" && echo "$run" >"$NODE_LOCK/owner"
}

node_config() {
  mkdir -p "$run/containerd" "$run/cni/net.d" "$run/cni/data" "$run/pod-logs" "$run/kubelet"
  cat >"$run/containerd/config.toml" <<EOF
version = 2
root = "$run/containerd/root"
state = "$run/containerd/state"
[grpc]
  address = "$run/containerd.sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$run/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$run/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$run/cni/net.d"
EOF
  # Only for the node's network readiness and any pod without hostNetwork: a bridge with
  # no masquerading (so no iptables rule), addresses kept under $run.
  cat >"$run/cni/net.d/10-kvinject-bed.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "kvinject-bed", "plugins": [
  {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$run/cni/data", "ranges": [[{"subnet": "$NODE_SUBNET"}]]}}]}
EOF
  cat >"$run/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
containerRuntimeEndpoint: unix://$run/containerd.sock
address: $NODE_IP
port: $(cat "$run/kubelet.port")
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $(cat "$run/kubelet-healthz.port")
tlsCertFile: $run/pki/kubelet-serving.crt
tlsPrivateKeyFile: $run/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $run/pki/ca.crt}
authorization: {mode: AlwaysAllow}
# Secret volumes follow updates within about this (kubelet's sync period).
syncFrequency: 5s
podLogsDir: $run/pod-logs
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
makeIPTablesUtilChains: false
protectKernelDefaults: false
registerWithTaints:
- key: ${NODE_TAINT%%=*}
  value: $(t=${NODE_TAINT#*=}; echo "${t%%:*}")
  effect: ${NODE_TAINT##*:}
serializeImagePulls: false
maxPods: 60
EOF
}

# An OCI image layout from a root filesystem directory: image NAME REF ROOTFS CONFIG-ARGS...
# (umoci; the layout's ref.name is the full reference, so `ctr images import` names it so).
oci_image() {
  local name=$1 ref=$2 rootfs=$3; shift 3
  local d=$run/images/$name
  rm -rf "$d" && mkdir -p "$d"
  umoci init --layout "$d/layout"
  umoci new --image "$d/layout:bed"
  umoci unpack --image "$d/layout:bed" "$d/bundle" >/dev/null
  cp -a "$rootfs/." "$d/bundle/rootfs/"
  umoci repack --image "$d/layout:bed" "$d/bundle"
  umoci config --image "$d/layout:bed" --no-history --os linux --architecture amd64 "$@"
  umoci gc --layout "$d/layout"
  python3 - "$d/layout/index.json" "$ref" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = ref
json.dump(index, open(path, "w"))
PY
  tar -C "$d/layout" -cf "$run/images/$name.tar" .
  rm -rf "$d/bundle"
}

node_images() {
  mkdir -p "$run/images"
  local r=$run/images/rootfs
  rm -rf "$r" && mkdir -p "$r/pause" "$r/busybox/bin" "$r/busybox/tmp"
  cp "$cache/bin/pause" "$r/pause/pause"
  oci_image pause "$PAUSE_IMAGE" "$r/pause" --config.entrypoint /pause
  cp /bin/busybox "$r/busybox/bin/busybox"
  local a
  for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -s busybox "$r/busybox/bin/$a"; done
  oci_image busybox "$BUSYBOX_IMAGE" "$r/busybox" --config.entrypoint /bin/sh --config.env PATH=/bin
  rm -rf "$r"
  ctr_node images import "$run/images/pause.tar" >/dev/null
  ctr_node images import "$run/images/busybox.tar" >/dev/null
}

ctr_node() { ctr --address "$run/containerd.sock" -n k8s.io "$@"; }

start_node() {
  local b=$cache/bin p
  for p in scheduler kubelet kubelet-healthz; do free_port >"$run/$p.port"; done
  node_save_host_state
  ip addr replace "$NODE_IP/32" dev lo
  # The kubelet's cgroupRoot, in every v1 hierarchy (cpuset's needs its CPUs and memory
  # nodes set before it can hold a process).
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -L ${h%/} || ! -d $h || $h == /sys/fs/cgroup/unified/ ]] && continue
    mkdir -p "$h$NODE_CGROUP"
  done
  if [[ -d /sys/fs/cgroup/cpuset/$NODE_CGROUP ]]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$NODE_CGROUP/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$NODE_CGROUP/cpuset.mems"
  fi
  node_certs
  node_config
  start kube-scheduler "$b/kube-scheduler" \
    --kubeconfig "$run/kubeconfig" --authentication-kubeconfig "$run/kubeconfig" \
    --authorization-kubeconfig "$run/kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$(cat "$run/scheduler.port")"
  start containerd containerd --config "$run/containerd/config.toml"
  wait_for containerd 30 ctr_node version
  node_images
  start kubelet "$b/kubelet" --config "$run/kubelet.yaml" --kubeconfig "$run/kubelet.kubeconfig" \
    --root-dir "$run/kubelet" --cert-dir "$run/kubelet-certs" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP"
  wait_for kube-scheduler 60 curl -skf "https://127.0.0.1:$(cat "$run/scheduler.port")/healthz"
  wait_for kubelet 60 node_ready
}

node_ready() {
  "$cache/bin/kubectl" --kubeconfig "$run/kubeconfig" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

# Stops the node and puts the host back, from the record up wrote; safe to run twice and
# after any of the node's processes died or were killed.
node_down() {
  local s=$run/node-host-state
  [[ -f $s ]] || return 0
  stop_one kubelet
  stop_one kube-scheduler
  # Pods' processes (shims and containers) live in the node's cgroups, not in the
  # processes' sessions: kill what is left there, then remove the cgroups.
  local h pid
  for _ in 1 2 3; do
    for pid in $(find /sys/fs/cgroup/*/"$NODE_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null || true) \
               $(pgrep -f "containerd-shim-runc-v2 .*-address $run/containerd.sock" || true); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    sleep 0.2
  done
  stop_one containerd
  # Mounts under $run (pods' volumes, sandboxes' namespaces, snapshots), deepest first.
  local m
  for m in $(awk -v r="$run/" 'index($2, r) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for h in /sys/fs/cgroup/*/"$NODE_CGROUP"; do
    [[ -d $h ]] && { find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true; }
  done
  ip link delete "$NODE_BRIDGE" 2>/dev/null || true
  ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
  local kind a b
  while read -r kind a b; do
    case $kind in
      sysctl) sysctl -qw "$a=$b" || true ;;
      path) rm -rf "$a" || true ;;
    esac
  done <"$s"
  rm -f "$s"
  if [[ -f $NODE_LOCK/owner && $(cat "$NODE_LOCK/owner") == "$run" ]]; then rm -rf "$NODE_LOCK"; fi
  return 0
}
