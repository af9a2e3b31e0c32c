# The test bed's nodes: a kube-scheduler, and two nodes, each a kubelet with a containerd
# of its own (Debian's containerd and runc), so pods really run, and two replicas of
# kvinject on the node network can run side by side (one per node, as the chart spreads
# them). Sourced by tests/testbed/testbed, which defines run, cache,
# start, alive, wait_for, stop_one, log and die.
#
# What this machine needs (../shared/node-notes.md has the errors behind each):
# - cgroup v1 only: the kubelet runs with failCgroupV1: false;
# - no CAP_SYS_RESOURCE: containerd clamps oom_score_adj (restrict_oom_score_adj), else runc
#   fails with "can't get final child's PID from pipe: EOF";
# - a loopback node IP is refused: each node's address is a /32 on lo (10.244.76.N),
#   removed by `down`; each kubelet listens only there;
# - makeIPTablesUtilChains: false, so the host's iptables stay untouched.
#
# The nodes are registered with the taint kvinject.test/node=real:NoSchedule: only pods that
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
# /run/containerd); the cgroups under each hierarchy's kvinject-bed/; the bridges kvbedN;
# the /32s on lo; mounts under $run. One bed per machine has nodes: a second runs without.
# Two kubelets share one fixed path, /var/lib/kubelet/device-plugins (no device plugin is
# used here).

NODES=${KVINJECT_TESTBED_NODES:-2}
node_name() { echo "kvinject-bed-node-$1"; }
node_ip() { echo "10.244.76.$1"; }
node_dir() { echo "$run/nodes/$(node_name "$1")"; }
NODE_TAINT=kvinject.test/node=real:NoSchedule
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
  # kubelet listens on sockets under its root directory, inside the bed's, and a socket's
  # path holds at most 107 bytes (its longest: pod-resources/ and a 10-digit number).
  local sock; sock="$(node_dir "$NODES")/kubelet/pod-resources/4294967295"
  ((${#sock} <= 107)) ||
    die "the bed's directory $run is too deep for the node: kubelet's socket $sock would be ${#sock} bytes, and a socket path holds at most 107; clone kvinject to a shorter path (or KVINJECT_TESTBED_NODE=0)"
  local owner
  owner=$(cat "$NODE_LOCK/owner" 2>/dev/null || true)
  if [[ -n $owner && $owner != "$run" ]]; then
    if node_lock_live "$owner"; then
      log "no node: the bed in $owner runs this machine's node"
      return 1
    fi
    log "node: taking over a stale node lock (the bed in $owner runs no node process)"
  fi
  return 0
}

# node_lock_live RUN: whether a node process of the bed in RUN is alive. A lock whose owner
# runs none is stale (a bed killed outright, or a machine copied with its /run), so a pid
# file alone does not count: the process must be that bed's (its command line names RUN).
node_lock_live() {
  local f pid
  for f in "$1"/containerd-*.pid "$1"/kubelet-*.pid; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$1/" && return 0
  done
  return 1
}

# node_certs N: the node's own client certificate (system:node:NAME in system:nodes, for
# Node authorization and NodeRestriction), its serving certificate and its kubeconfig.
node_certs() {
  local d=$run/pki n=$1 name ip nd
  name=$(node_name "$1") ip=$(node_ip "$1") nd=$(node_dir "$1")
  leaf "kubelet-client-$n" "/O=system:nodes/CN=system:node:$name" "DNS:$name" clientAuth
  leaf "kubelet-serving-$n" "/CN=$name" "IP:$ip,DNS:$name" serverAuth
  local b64="base64 -w0"
  cat >"$nd/kubelet.kubeconfig" <<EOF
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
    client-certificate-data: $($b64 "$d/kubelet-client-$n.crt")
    client-key-data: $($b64 "$d/kubelet-client-$n.key")
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
  echo "nodes $NODES" >>"$s.tmp"
  mv "$s.tmp" "$s"
  mkdir -p "$NODE_LOCK" && echo "$run" >"$NODE_LOCK/owner"
}

# node_config N: containerd's, the CNI network's and the kubelet's configuration.
node_config() {
  local n=$1 nd ip
  nd=$(node_dir "$1") ip=$(node_ip "$1")
  mkdir -p "$nd/containerd" "$nd/cni/net.d" "$nd/cni/data" "$nd/pod-logs" "$nd/kubelet"
  cat >"$nd/containerd/config.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
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
        Root = "$nd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni/net.d"
EOF
  # Only for the node's network readiness and any pod without hostNetwork: a bridge with
  # no masquerading (so no iptables rule), addresses kept under $run.
  cat >"$nd/cni/net.d/10-kvinject-bed.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "kvinject-bed", "plugins": [
  {"type": "bridge", "bridge": "kvbed$n", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$nd/cni/data", "ranges": [[{"subnet": "10.244.$((76 + n)).0/24"}]]}}]}
EOF
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP/n$n
containerRuntimeEndpoint: unix://$nd/containerd.sock
address: $ip
port: $(cat "$run/kubelet-$n.port")
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $(cat "$run/kubelet-healthz-$n.port")
tlsCertFile: $run/pki/kubelet-serving-$n.crt
tlsPrivateKeyFile: $run/pki/kubelet-serving-$n.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $run/pki/ca.crt}
authorization: {mode: AlwaysAllow}
# Secret volumes follow updates within about this (kubelet's sync period).
syncFrequency: 5s
podLogsDir: $nd/pod-logs
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

# The bed's images, made once per bed, imported into every node's containerd.
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
}

# ctr_node N ARGS...: ctr against node N's containerd.
ctr_node() { local n=$1; shift; ctr --address "$(node_dir "$n")/containerd.sock" -n k8s.io "$@"; }

start_node() {
  local b=$cache/bin p n h
  free_port >"$run/scheduler.port"
  for ((n = 1; n <= NODES; n++)); do
    for p in kubelet kubelet-healthz; do free_port >"$run/$p-$n.port"; done
  done
  node_save_host_state
  # Each kubelet's cgroupRoot, in every v1 hierarchy (cpuset's needs its CPUs and memory
  # nodes set before it can hold a process).
  for h in /sys/fs/cgroup/*/; do
    [[ -L ${h%/} || ! -d $h || $h == /sys/fs/cgroup/unified/ ]] && continue
    for ((n = 1; n <= NODES; n++)); do mkdir -p "$h$NODE_CGROUP/n$n"; done
  done
  if [[ -d /sys/fs/cgroup/cpuset/$NODE_CGROUP ]]; then
    local c=/sys/fs/cgroup/cpuset
    local d
    for d in "" $(seq -f "/n%g" 1 "$NODES"); do
      cat "$c/cpuset.cpus" >"$c/$NODE_CGROUP$d/cpuset.cpus"
      cat "$c/cpuset.mems" >"$c/$NODE_CGROUP$d/cpuset.mems"
    done
  fi
  start kube-scheduler "$b/kube-scheduler" \
    --kubeconfig "$run/kubeconfig" --authentication-kubeconfig "$run/kubeconfig" \
    --authorization-kubeconfig "$run/kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$(cat "$run/scheduler.port")"
  node_images
  for ((n = 1; n <= NODES; n++)); do
    local nd; nd=$(node_dir "$n")
    mkdir -p "$nd"
    ip addr replace "$(node_ip "$n")/32" dev lo
    node_certs "$n"
    node_config "$n"
    start "containerd-$n" containerd --config "$nd/containerd/config.toml"
    wait_for "containerd-$n" 30 ctr_node "$n" version
    ctr_node "$n" images import "$run/images/pause.tar" >/dev/null
    ctr_node "$n" images import "$run/images/busybox.tar" >/dev/null
    start "kubelet-$n" "$b/kubelet" --config "$nd/kubelet.yaml" --kubeconfig "$nd/kubelet.kubeconfig" \
      --root-dir "$nd/kubelet" --cert-dir "$nd/kubelet-certs" \
      --hostname-override "$(node_name "$n")" --node-ip "$(node_ip "$n")"
  done
  wait_for kube-scheduler 60 curl -skf "https://127.0.0.1:$(cat "$run/scheduler.port")/healthz"
  for ((n = 1; n <= NODES; n++)); do wait_for "kubelet-$n" 60 node_ready "$n"; done
}

node_ready() {
  "$cache/bin/kubectl" --kubeconfig "$run/kubeconfig" get node "$(node_name "$1")" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

# The nodes' names, space-separated, when this bed runs them.
node_names() {
  [[ -f $run/node-host-state ]] || return 0
  local n out=()
  for ((n = 1; n <= NODES; n++)); do out+=("$(node_name "$n")"); done
  echo "${out[*]}"
}

# Stops the nodes and puts the host back, from the record up wrote; safe to run twice and
# after any of the nodes' processes died or were killed.
node_down() {
  local s=$run/node-host-state
  [[ -f $s ]] || return 0
  NODES=$(awk '$1 == "nodes" {print $2}' "$s")
  NODES=${NODES:-1}
  local n pid h
  for ((n = 1; n <= NODES; n++)); do stop_one "kubelet-$n"; done
  stop_one kube-scheduler
  # Pods' processes (shims and containers) live in the nodes' cgroups, not in the
  # processes' sessions: kill what is left there, then remove the cgroups.
  for _ in 1 2 3; do
    for pid in $(find /sys/fs/cgroup/*/"$NODE_CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null || true) \
               $(pgrep -f "containerd-shim-runc-v2 .*-address $run/nodes/" || true); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    sleep 0.2
  done
  for ((n = 1; n <= NODES; n++)); do stop_one "containerd-$n"; done
  # Mounts under $run (pods' volumes, sandboxes' namespaces, snapshots), deepest first.
  local m
  for m in $(awk -v r="$run/" 'index($2, r) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for h in /sys/fs/cgroup/*/"$NODE_CGROUP"; do
    [[ -d $h ]] && { find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true; }
  done
  for ((n = 1; n <= NODES; n++)); do
    ip link delete "kvbed$n" 2>/dev/null || true
    ip addr del "$(node_ip "$n")/32" dev lo 2>/dev/null || true
  done
  local kind a b
  while read -r kind a b; do
    case $kind in
      sysctl) sysctl -qw "$a=$b" || true ;;
      path) rm -rf "$a" || true ;;
      nodes) NODES=$a ;;
    esac
  done <"$s"
  rm -f "$s"
  if [[ -f $NODE_LOCK/owner && $(cat "$NODE_LOCK/owner") == "$run" ]]; then rm -rf "$NODE_LOCK"; fi
  return 0
}
