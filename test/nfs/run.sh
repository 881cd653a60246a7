#!/usr/bin/env bash
# The store on the real Linux kernel NFS client: boots a QEMU guest (TCG, no
# KVM needed) running Debian's kernel, which mounts this machine's root
# read-only over virtio-9p, chroots into it, exports a tmpfs with the kernel
# NFS server over loopback and runs test/nfs/suite.ts there with the
# project's own built engine (dist/, native/build) on NFS 4.2 and NFS 3, two
# mounts (nosharecache) standing for two nodes. Idempotent: installs what it
# needs with apt-get, builds the initramfs, compiles the suite.
#
#   bash test/nfs/run.sh [mode]      mode: all (default); smoke (boot and
#                                    mount only); suite flags such as
#                                    "vers=3,only=bench+hung" (see suite.ts);
#                                    script=/abs/path.sh (run that in the
#                                    guest instead, for working on it)
#
# The guest: 2 vCPUs of emulated "max" CPU without SSE4.2 (TCG emulates the
# crc32 instruction byte by byte, 4x slower than the engine's table-driven
# CRC32C, which it then uses; UCM_NFS_QEMU_CPU overrides), 4 GiB. The whole
# guest run is stopped after UCM_NFS_GUEST_TIMEOUT_S (780) seconds.
#
# Ends with "N passed, N failed" (exit 0 when none failed, 1 otherwise).
# Exit 77 with "NFS suite skipped: <why>" and no count line when the guest
# cannot be set up for a reason outside the project (apt unreachable, no
# QEMU or kernel package to be had). The guest's serial console is kept in
# .test-tmp/nfs/console.log, the suite's results in .test-tmp/nfs/out/.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
mode=${1:-all}
work="$root/.test-tmp/nfs"
out="$work/out"
log="$work/console.log"
# Whole guest run; the suite itself keeps well inside it (15 minutes in all
# on 2 cores is the budget for this script).
guest_timeout_s=${UCM_NFS_GUEST_TIMEOUT_S:-780}
t_start=$(date +%s)

skip() {
  echo "NFS suite skipped: $*"
  exit 77
}
broken() {
  echo "NFS suite: $*"
  echo "0 passed, 1 failed"
  exit 1
}

# ---- what the guest needs, from Debian's packages ---------------------------
need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need_pkgs+=(qemu-system-x86)
for c in rpc.nfsd exportfs rpc.mountd; do have "$c" || { need_pkgs+=(nfs-kernel-server); break; }; done
for c in mount.nfs rpcbind rpc.statd; do have "$c" || { need_pkgs+=(nfs-common rpcbind); break; }; done
have fio || need_pkgs+=(fio)
have cpio || need_pkgs+=(cpio)
# The initramfs needs a statically linked busybox (busybox-static).
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || need_pkgs+=(busybox-static)

# A kernel with the NFS server and client, virtio and 9p: the newest
# /boot/vmlinuz-* whose modules include nfsd.
pick_kernel() {
  kver=""
  for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V); do
    if ls /lib/modules/"$k"/kernel/fs/nfsd/nfsd.ko* >/dev/null 2>&1; then kver=$k; fi
  done
}
pick_kernel
[ -n "$kver" ] || need_pkgs+=(linux-image-amd64)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== NFS guest: installing ${need_pkgs[*]} (apt-get)"
  [ "$(id -u)" -eq 0 ] || skip "needs root to install ${need_pkgs[*]} with apt-get"
  have apt-get || skip "no apt-get to install ${need_pkgs[*]}"
  if ! apt-get update -qq >"$root/.test-tmp/nfs-apt.log" 2>&1; then
    tail -5 "$root/.test-tmp/nfs-apt.log"
    skip "apt-get update failed (package registry unreachable?)"
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >>"$root/.test-tmp/nfs-apt.log" 2>&1; then
    tail -20 "$root/.test-tmp/nfs-apt.log"
    if grep -qiE "Could not resolve|Failed to fetch|Temporary failure|Unable to locate package|Connection (refused|timed out)" "$root/.test-tmp/nfs-apt.log"; then
      skip "apt-get install ${need_pkgs[*]} failed (package registry unreachable?)"
    fi
    broken "apt-get install ${need_pkgs[*]} failed (log: .test-tmp/nfs-apt.log)"
  fi
  pick_kernel
fi
[ -n "$kver" ] || broken "no kernel with nfsd.ko under /lib/modules after installing linux-image-amd64"
have qemu-system-x86_64 || broken "qemu-system-x86_64 missing after the install"
[ "$(id -u)" -eq 0 ] || skip "needs root (reads /boot/vmlinuz-$kver, exports / read-only to the guest)"
[ -f "$root/dist/core/cli.js" ] && ls "$root"/native/build/Release/*.node >/dev/null 2>&1 ||
  broken "the engine is not built (dist/core/cli.js, native/build): run npm install first"

# ---- initramfs: busybox, the virtio and 9p modules, test/nfs/init.sh ---------
mkdir -p "$work"
rm -rf "$out" "$work/initramfs"
mkdir -p "$out" "$work/initramfs"/{bin,modules,proc,sys,dev,newroot}
ird="$work/initramfs"
cp /bin/busybox "$ird/bin/busybox"
cp "$root/test/nfs/init.sh" "$ird/init"
chmod 755 "$ird/init" "$ird/bin/busybox"
: >"$ird/modules.order"
for m in virtio_pci 9pnet_virtio 9p; do
  modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r f; do
  name=$(basename "$f" | sed -E 's/\.ko(\.(xz|zst|gz))?$//')
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$ird/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$ird/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$ird/modules/$name.ko" ;;
    *) cp "$f" "$ird/modules/$name.ko" ;;
  esac
  echo "$name" >>"$ird/modules.order"
done
[ -s "$ird/modules.order" ] || broken "could not resolve the virtio/9p modules of kernel $kver (modprobe --show-depends)"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz" ||
  broken "could not pack the initramfs"

# ---- the engine as built now, and the suite ----------------------------------
# The guest runs a copy of the built engine (dist/, the addon) taken here, so a
# rebuild in this tree while the guest runs cannot change it under the suite.
# node_modules are the tree's own (the copy lies below the repository root).
snap="$work/snap"
rm -rf "$snap"
mkdir -p "$snap/native/build/Release"
cp -a "$root/dist" "$snap/dist" && cp "$root"/native/build/Release/*.node "$snap/native/build/Release/" ||
  broken "could not copy the built engine into .test-tmp/nfs/snap"
if [ "$mode" != "smoke" ] && [[ "$mode" != script=* ]]; then
  if ! npx tsc -p test/nfs/tsconfig.json >"$work/tsc.log" 2>&1; then
    cat "$work/tsc.log"
    broken "test/nfs/suite.ts does not compile"
  fi
  node -e 'require(process.argv[1])' "$snap/dist/core/native.js" 2>"$work/addon.log" ||
    { cat "$work/addon.log"; broken "the copied engine's addon does not load"; }
fi

# ---- boot --------------------------------------------------------------------
echo "== NFS guest: kernel $kver, QEMU TCG (2 vCPUs, 4 GiB), mode $mode; console: .test-tmp/nfs/console.log"
rm -f "$log"
qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu "${UCM_NFS_QEMU_CPU:-max,sse4.2=off}" -smp 2 -m 4096 \
  -kernel "/boot/vmlinuz-$kver" -initrd "$work/initramfs.cpio.gz" \
  -append "console=ttyS0 loglevel=4 panic=-1 ucm.repo=$root ucm.mode=$mode" \
  -fsdev local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev local,id=out,path="$out",security_model=none \
  -device virtio-9p-pci,fsdev=out,mount_tag=out \
  -nic none -display none -monitor none -no-reboot \
  -serial file:"$log" </dev/null >"$work/qemu.log" 2>&1 &
qpid=$!
for _ in $(seq 50); do [ -e "$log" ] && break; sleep 0.1; done
tail -n +1 -f "$log" 2>/dev/null --pid=$qpid | grep --line-buffered -E "^\[(guest|guest-init|nfs)\]|passed, .* failed|FAIL|PASS" &
tpid=$!
deadline=$((SECONDS + guest_timeout_s))
while kill -0 "$qpid" 2>/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "NFS guest: still running after ${guest_timeout_s}s: stopped"
    kill "$qpid" 2>/dev/null
    sleep 2
    kill -9 "$qpid" 2>/dev/null
    echo "timeout" >"$out/guest-timeout"
    break
  fi
  sleep 1
done
wait "$qpid" 2>/dev/null
qrc=$?
sleep 0.5
kill "$tpid" 2>/dev/null
wait "$tpid" 2>/dev/null
elapsed=$(($(date +%s) - t_start))

if [ ! -e "$out/server-up" ]; then
  echo "---- last console lines (.test-tmp/nfs/console.log)"
  tail -40 "$log"
  cat "$work/qemu.log"
  broken "the guest did not come up (QEMU exit $qrc)$([ -e "$out/setup-failed" ] && echo ": $(cat "$out/setup-failed")")"
fi
if [[ "$mode" == script=* ]]; then
  echo "script exited with $(cat "$out/script-rc" 2>/dev/null || echo "?") (${elapsed}s); console: .test-tmp/nfs/console.log"
  exit 0
fi
if [ "$mode" = "smoke" ]; then
  [ -e "$out/smoke" ] && { echo "smoke: guest booted, NFS 4.2 and NFS 3 mounted (${elapsed}s)"; echo "1 passed, 0 failed"; exit 0; }
  tail -30 "$log"
  broken "smoke: NFS mounts failed"
fi

# ---- results -------------------------------------------------------------------
node "$snap/test/nfs/suite.js" --report "$out" "$elapsed"
