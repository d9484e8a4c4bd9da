#!/bin/sh
# signer-base:bookworm without a registry: debootstrap --variant=minbase from the Debian mirror,
# trimmed like debian:bookworm-slim, imported with `docker import`. The trimmed tree is cached as
# a tarball keyed by this script, trim-rootfs.sh, the mirror and the ISO week (security updates
# arrive at most a week late; SIGNER_BASE_REFRESH=1 rebuilds now).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tag=${SIGNER_BASE_TAG:-signer-base:bookworm}
docker=${DOCKER:-docker}
mirror=${SIGNER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/signer
key=$( { cat "$0" "$here/trim-rootfs.sh"; echo "$mirror"; date -u +%G-W%V; } | sha256sum | cut -c1-16)
tarball=$cache/base-bookworm-$key.tar.gz
if [ -z "${SIGNER_BASE_REFRESH:-}" ] && $docker image inspect "$tag" --format '{{index .Config.Labels "signer.base.key"}}' 2>/dev/null | grep -qx "$key"; then
  echo "$tag is current ($key)"; exit 0
fi
if [ -n "${SIGNER_BASE_REFRESH:-}" ] || [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
  work=$(mktemp -d /var/tmp/signer-base.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  "$here/trim-rootfs.sh" "$work/root"
  mkdir -p "$cache"
  find "$cache" -name 'base-bookworm-*.tar.gz' -delete
  tar --numeric-owner -C "$work/root" -c . | gzip -1 > "$tarball.tmp" && mv "$tarball.tmp" "$tarball"
fi
$docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' -c "LABEL signer.base.key=$key" \
  -m "debootstrap --variant=minbase bookworm, trimmed ($key)" "$tarball" "$tag"
