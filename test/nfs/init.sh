#!/bin/busybox sh
# /init of the NFS test guest's initramfs (busybox). Loads the virtio and 9p
# modules, mounts the host's root read-only over virtio-9p (tag "hostroot")
# and the writable results share (tag "out"), gives the chroot the writable
# places it needs (tmpfs), then runs test/nfs/guest.sh chrooted into the host
# root and powers off. Kernel command line: ucm.repo=<repository path>
# ucm.mode=<what guest.sh runs>.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "[guest-init] $*"; }
die() {
  say "FATAL: $*"
  echo "GUEST-SETUP-FAILED: $*" >/dev/console
  poweroff -f
  sleep 5
  echo o >/proc/sysrq-trigger
}

for m in $(cat /modules.order); do
  insmod "/modules/$m.ko" 2>/dev/null || say "insmod $m failed (built in, or already loaded?)"
done

repo=""
mode="all"
for w in $(cat /proc/cmdline); do
  case "$w" in
    ucm.repo=*) repo="${w#ucm.repo=}" ;;
    ucm.mode=*) mode="${w#ucm.mode=}" ;;
  esac
done
[ -n "$repo" ] || die "no ucm.repo= on the kernel command line"

# The host's root directory is mode 0700 here, which daemons that drop root
# (rpcbind runs as _rpc) cannot traverse. So the new root is a tmpfs of mode
# 0755 holding bind mounts of the host root's top-level directories (and
# copies of its symlinks), with tmpfs where the guest needs to write.
mkdir -p /host /newroot
tries=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host 2>/dev/null; do
  tries=$((tries + 1))
  [ "$tries" -lt 20 ] || die "cannot mount the host root over virtio-9p (tag hostroot)"
  sleep 0.5
done
R=/newroot
mount -t tmpfs -o mode=0755 tmpfs $R || die "tmpfs for the new root"
for e in /host/* /host/.[!.]*; do
  [ -e "$e" ] || [ -L "$e" ] || continue
  n=${e#/host/}
  case "$n" in
    proc | sys | dev | tmp | run | mnt | srv | lost+found) mkdir -p "$R/$n" ;;
    *)
      if [ -L "$e" ]; then
        ln -s "$(readlink "$e")" "$R/$n"
      elif [ -d "$e" ]; then
        mkdir -p "$R/$n" && mount --bind "$e" "$R/$n" || die "bind mount of /$n"
      fi
      ;;
  esac
done
mount -t proc proc $R/proc || die "proc"
mount -t sysfs sysfs $R/sys || die "sysfs"
mount -t devtmpfs devtmpfs $R/dev || die "devtmpfs"
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || die "/dev/shm"
mount -t devpts devpts $R/dev/pts 2>/dev/null
for d in /tmp /run /mnt /srv /var/lib/nfs /var/tmp; do
  mount -t tmpfs -o mode=0755 tmpfs "$R$d" || die "tmpfs on $d"
done
chmod 1777 $R/tmp $R/var/tmp
# A checkout under one of the directories just replaced by a tmpfs (CI may
# clone into /tmp) is brought back from the host root at the same path.
if [ ! -e "$R$repo/test/nfs/guest.sh" ]; then
  mkdir -p "$R$repo" && mount --bind "/host$repo" "$R$repo" || die "bind mount of the repository $repo"
fi
mkdir -p $R/mnt/out
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=524288 out $R/mnt/out || die "cannot mount the results share (tag out)"
hostname nfsguest
ip link set lo up || ifconfig lo 127.0.0.1 up

say "host root mounted; running $repo/test/nfs/guest.sh $mode"
chroot $R /bin/bash "$repo/test/nfs/guest.sh" "$mode" "$repo"
say "guest.sh exited with $?"
sync
umount $R/mnt/out 2>/dev/null
poweroff -f
sleep 5
echo o >/proc/sysrq-trigger
