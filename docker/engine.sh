#!/bin/sh
# A Docker engine where none runs (make docker-engine; README, "Deploying"): Debian's docker.io
# dockerd, started by hand (no systemd needed), with no iptables and no bridge (the containers
# use host networking and Unix sockets, which is all the stack needs, and works on machines
# where the engine may not touch the firewall). overlay2 where this kernel mounts an overlay
# on /var/lib/docker's file system, else vfs (much larger on disk). Its log and pid file in
# var/docker. `engine.sh stop` stops the engine started here, and only that one.
set -eu
state=${SIGNER_DOCKER_STATE:-$(pwd)/var/docker}
data_root=${SIGNER_DOCKER_DATA_ROOT:-/var/lib/docker}

# Called in a condition, where set -e does not apply: every step checks its own failure, so
# that an empty $probe can never name directories under /.
overlay_works() {
  mkdir -p "$data_root" || return 1
  probe=$(mktemp -d "$data_root/.overlay-probe.XXXXXX") || return 1
  [ -n "$probe" ] && [ -d "$probe" ] || return 1
  mkdir "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged" || { rm -rf "$probe"; return 1; }
  ok=1
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
      "$probe/merged" 2>/dev/null; then
    umount "$probe/merged" && ok=0
  fi
  rm -rf "$probe"
  return $ok
}

case "${1:-start}" in
start)
  command -v dockerd >/dev/null || { echo "dockerd missing: apt-get install docker.io" >&2; exit 1; }
  [ "$(id -u)" = 0 ] || { echo "starting dockerd needs root (make docker-engine uses sudo)" >&2; exit 1; }
  if [ -s "$state/dockerd.pid" ] && kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
    echo "dockerd $(cat "$state/dockerd.pid") (started here) runs but does not answer" >&2; exit 1
  fi
  if overlay_works; then driver=overlay2; else driver=vfs; fi
  mkdir -p "$state"
  echo "starting dockerd (storage driver $driver; log $state/dockerd.log)"
  nohup dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=$driver \
    --data-root "$data_root" --pidfile "$state/dockerd.pid" >"$state/dockerd.log" 2>&1 &
  i=0; until docker info >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 600 ] || { echo "dockerd did not answer in 60 s:" >&2; tail -20 "$state/dockerd.log" >&2; exit 1; }
    sleep 0.1
  done ;;
stop)
  [ -s "$state/dockerd.pid" ] || { echo "no dockerd started here"; exit 0; }
  pid=$(cat "$state/dockerd.pid")
  kill "$pid" 2>/dev/null || { rm -f "$state/dockerd.pid"; exit 0; }
  i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do i=$((i + 1)); sleep 0.1; done
  # dockerd leaves its network namespace mounted (rm -rf of its directory would then fail).
  umount /run/docker/netns/default 2>/dev/null || true ;;
*) echo "usage: engine.sh start|stop" >&2; exit 2 ;;
esac
