#!/usr/bin/env bash
# Builds a throwaway world for the two-user tests and runs a command in it as
# root: called under `unshare --mount --pid --fork --propagation private`, so
# every mount made here vanishes with the command, and every process started
# in it (an engine the shim started, say) is killed when the command ends. The world is the machine's own files
# under a new root directory of mode 0755 (the sandbox's / is 0700, which no
# other user could cross), with a private copy of /etc (users added there
# exist only in this world), and fresh empty /tmp and /dev/shm (what a user
# plants there, and every socket, key and store, is gone afterwards).
# usage: [UCM_WORLD_KEEP=<path>:...] multiuser_world.sh <empty dir> <command...>
set -euo pipefail
root=$1
shift
mount -t tmpfs -o mode=0755 tmpfs "$root"
for entry in /*; do
  name=$(basename "$entry")
  if [ -L "$entry" ]; then
    cp -P "$entry" "$root/$name"
    continue
  fi
  [ -d "$entry" ] || continue
  mkdir "$root/$name"
  case $name in
    tmp) mount -t tmpfs -o mode=1777 tmpfs "$root/tmp" ;;
    etc) mount -t tmpfs -o mode=0755 tmpfs "$root/etc" && cp -a /etc/. "$root/etc/" ;;
    proc) mount -t proc proc "$root/proc" ;;
    dev | sys | run) mount --rbind "$entry" "$root/$name" ;;
    *) mount --bind "$entry" "$root/$name" ;;
  esac
done
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
# Paths that must stay visible though they lie under the fresh /tmp (a
# checkout in /tmp, say): UCM_WORLD_KEEP, colon-separated, each bound at its
# own path.
IFS=: read -r -a keep <<<"${UCM_WORLD_KEEP:-}"
for p in "${keep[@]}"; do
  case $p in
    /tmp/*)
      mkdir -p "$root$p"
      mount --bind "$p" "$root$p"
      ;;
  esac
done
exec chroot "$root" "$@"
