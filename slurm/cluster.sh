#!/usr/bin/env bash
# A local Slurm cluster on this machine, for the tests and for trying mnist-dist's SLURM path.
#
#   sudo bash slurm/cluster.sh start [--nodes 1|2]   # install (Debian), configure, start; waits until idle
#   sudo bash slurm/cluster.sh check                 # exit 0 when the nodes are up and a 1-task srun works
#   sudo bash slurm/cluster.sh stop                  # stop what start started (munged included), remove the namespaces
#
# Layouts. --nodes 1: one node, node0, the machine itself (127.0.0.1). --nodes 2 (default): two hosts,
# node1 and node2, each a network namespace joined to a bridge by a veth pair (interface eth0 inside),
# so a job's ranks really talk over a network; jobs need GLOO_SOCKET_IFNAME=eth0 so gloo does not bind
# the loopback. Partitions `gpu` (default) and `cpu` hold every node. proctrack/linuxproc, task/none,
# no accounting (sacct answers nothing, as on many small clusters). Needs root and apt.
# The cluster's slurm.conf is /etc/slurm/slurm.conf, so sbatch/squeue/srun need no SLURM_CONF.
set -euo pipefail

cmd=${1:-start}
shift || true
nodes=2
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$nodes" in 1|2) ;; *) echo "--nodes must be 1 or 2" >&2; exit 2 ;; esac

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by mnist-dist slurm/cluster.sh"
SUBNET=10.250.77          # addresses of our own namespaces only; nothing else is contacted
BRIDGE=mdbr0
STATE=/var/lib/mnist-dist-slurm

die() { echo "cluster.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons)"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null && command -v ip >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "no apt-get: install slurmctld slurmd munge slurm-client yourself"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd munge slurm-client iproute2 procps >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  local started=""
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
    started=yes
  fi
  for _ in $(seq 50); do
    if munge -n >/dev/null 2>&1; then
      if [ -n "$started" ]; then  # ours: `stop` stops it (a munged found running is left alone)
        mkdir -p "$STATE"
        cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -x -o munged > "$STATE/munged.pid" || true
      fi
      return
    fi
    sleep 0.1
  done
  die "munged did not start"
}

node_line() {  # NodeName line with this machine's real CPUs and memory (slurmd -C)
  local name=$1 addr=$2 hw
  hw=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
  echo "NodeName=$name NodeAddr=$addr NodeHostname=$name $hw State=UNKNOWN"
}

write_conf() {
  local ctl_addr=$1; shift
  if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
    cp "$CONF" "$CONF.before-mnist-dist"
  fi
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,log} "$STATE"/spool/node{0,1,2}
  {
    echo "$MARK ($nodes node(s)); remove with: bash slurm/cluster.sh stop"
    cat <<EOF
ClusterName=mnistdist
SlurmctldHost=$(hostname -s)($ctl_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
MessageTimeout=20
SlurmdTimeout=60
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SchedulerParameters=sched_interval=2
EOF
    for line in "$@"; do echo "$line"; done
    echo "PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    echo "PartitionName=cpu Nodes=ALL MaxTime=INFINITE State=UP OverSubscribe=YES"
  } > "$CONF"
}

hosts_entry() {  # /etc/hosts line for a node, once
  local addr=$1 name=$2
  grep -qE "^$addr[[:space:]]+$name\$" /etc/hosts || echo "$addr $name" >> /etc/hosts
}

make_namespace() {
  local name=$1 addr=$2 idx=$3
  ip netns list | grep -qw "$name" && return
  ip netns add "$name"
  ip link add "veth-$name" type veth peer name "vp$idx"
  ip link set "vp$idx" netns "$name"
  ip link set "veth-$name" master "$BRIDGE" up
  ip netns exec "$name" ip link set "vp$idx" name eth0
  ip netns exec "$name" ip addr add "$addr/24" dev eth0
  ip netns exec "$name" ip link set eth0 up
  ip netns exec "$name" ip link set lo up
}

stop_all() {
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  for _ in $(seq 50); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
    sleep 0.1
  done
  pkill -9 -x slurmd 2>/dev/null || true
  pkill -9 -x slurmctld 2>/dev/null || true
  for ns in node1 node2; do
    ip netns del "$ns" 2>/dev/null || true
    ip link del "veth-$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "$STATE/ctld" "$STATE/spool"
}

stop_munge() {  # the munged `start` started, if it is still that process; never another one
  local pid
  pid=$(cat "$STATE/munged.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  fi
  rm -f "$STATE/munged.pid"
}

wait_idle() {
  local want=$1
  for _ in $(seq 120); do
    local idle
    idle=$(sinfo -h -p gpu -t idle,mix -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}')
    [ "$idle" -ge "$want" ] && return 0
    sleep 0.5
  done
  sinfo -N -l >&2 || true
  tail -20 "$STATE"/log/*.log >&2 || true
  die "nodes did not become idle"
}

start() {
  need_root
  install_packages
  stop_all
  start_munge
  if [ "$nodes" = 1 ]; then
    write_conf 127.0.0.1 "$(node_line node0 127.0.0.1)"
    hosts_entry 127.0.0.1 node0
    slurmctld -i
    slurmd -N node0
  else
    ip link add "$BRIDGE" type bridge 2>/dev/null || true
    ip addr add "$SUBNET.1/24" dev "$BRIDGE" 2>/dev/null || true
    ip link set "$BRIDGE" up
    make_namespace node1 "$SUBNET.11" 1
    make_namespace node2 "$SUBNET.12" 2
    hosts_entry "$SUBNET.11" node1
    hosts_entry "$SUBNET.12" node2
    write_conf "$SUBNET.1" "$(node_line node1 "$SUBNET.11")" "$(node_line node2 "$SUBNET.12")"
    slurmctld -i
    # nsenter, not `ip netns exec`: the latter remounts /sys without cgroups and slurmd refuses.
    nsenter --net=/var/run/netns/node1 slurmd -N node1
    nsenter --net=/var/run/netns/node2 slurmd -N node2
  fi
  wait_idle "$nodes"
  echo "slurm cluster up: $nodes node(s); partitions gpu (default) and cpu"
  sinfo
}

check() {
  command -v sbatch >/dev/null || die "sbatch not found"
  local n
  n=$(sinfo -h -p gpu -t idle,mix,alloc -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}' || true)
  [ "$n" -ge 1 ] || die "no node up"
  srun -p gpu -N 1 -n 1 -t 1 true || die "srun failed"
  echo "ok: $n node(s) up"
}

case "$cmd" in
  start) start ;;
  stop) need_root; stop_all; stop_munge; echo "slurm cluster stopped" ;;
  check) check ;;
  *) echo "usage: $0 start [--nodes 1|2] | check | stop" >&2; exit 2 ;;
esac
