#!/bin/bash
# Runs inside the NFS test guest, chrooted into the host's root (read-only,
# with tmpfs on /tmp, /run, /mnt, /srv, /var/lib/nfs; results go to /mnt/out).
# Starts a kernel NFS server exporting a tmpfs over loopback (rpcbind, statd
# and lockd for NFS 3; short v4 lease and grace times so the suite does not
# wait 90 s for the grace period), then runs the suite (test/nfs/suite.ts,
# compiled by run.sh beside its copy of the built engine in
# .test-tmp/nfs/snap), which mounts the export itself.
#   guest.sh <mode> <repo>     mode: all | smoke | script=<path> | suite flags
set -uo pipefail
mode=${1:-all}
repo=${2:?repository path}
out=/mnt/out
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp
cd "$repo" || exit 1

step() { echo "[guest] $*"; }
fail() {
  echo "[guest] SETUP FAILED: $*"
  echo "$*" >"$out/setup-failed"
  exit 1
}

step "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
mkdir -p /var/lib/nfs/sm /var/lib/nfs/sm.bak /var/lib/nfs/v4recovery /run/rpcbind /srv/export
: >/var/lib/nfs/etab
: >/var/lib/nfs/rmtab
echo 0 >/var/lib/nfs/state

modprobe nfsd || fail "modprobe nfsd"
modprobe nfs || fail "modprobe nfs"
modprobe nfsv3 || fail "modprobe nfsv3"
modprobe nfsv4 || fail "modprobe nfsv4"
mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd || fail "mount nfsd filesystem"
# A fresh server is in its grace period (90 s by default): no new opens or
# locks until it ends. 10 s is the kernel's minimum.
echo 10 >/proc/fs/nfsd/nfsv4leasetime || fail "nfsv4leasetime"
echo 10 >/proc/fs/nfsd/nfsv4gracetime || fail "nfsv4gracetime"
sysctl -q -w fs.nfs.nlm_grace_period=10 2>/dev/null || true

# The exported directory: a tmpfs, so the server's own disk is never the
# bottleneck. fsid=0 makes it the NFSv4 root (mounted as 127.0.0.1:/): the
# guest's root is 9p, which nfsd cannot build a v4 pseudo-root on. NFS 3
# mounts it by its path, 127.0.0.1:/srv/export.
mount -t tmpfs -o size=1800m,mode=0755 tmpfs /srv/export || fail "tmpfs for the export"
rpcbind -w || fail "rpcbind"
rpc.statd --no-notify || fail "rpc.statd"
exportfs -o rw,sync,no_root_squash,insecure,no_subtree_check,fsid=0 127.0.0.1:/srv/export || fail "exportfs"
rpc.mountd || fail "rpc.mountd"
rpc.nfsd 8 || fail "rpc.nfsd"
step "NFS server up: $(cat /proc/fs/nfsd/versions)"
echo up >"$out/server-up"

# For working on the guest: run.sh script=/abs/path/to/script.sh runs that
# script here instead of the suite (the server is up, nothing is mounted).
if [[ "$mode" == script=* ]]; then
  bash "${mode#script=}"
  echo "$?" >"$out/script-rc"
  exit 0
fi
if [ "$mode" = "smoke" ]; then
  mkdir -p /mnt/a /mnt/b
  mount -t nfs -o vers=4.2 127.0.0.1:/ /mnt/a && mount -t nfs -o vers=3,nosharecache 127.0.0.1:/srv/export /mnt/b &&
    echo hello >/mnt/a/x && cat /mnt/b/x && grep nfs /proc/mounts && echo ok >"$out/smoke"
  exit 0
fi

node_bin=$(command -v node) || fail "node not found in the host root"
step "suite: $node_bin $("$node_bin" --version), mode $mode"
"$node_bin" "$repo/.test-tmp/nfs/snap/test/nfs/suite.js" --out "$out" --export /srv/export --mode "$mode"
rc=$?
step "suite exited with $rc"
echo "$rc" >"$out/suite-rc"
exit 0
