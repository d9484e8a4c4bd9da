#!/bin/sh
# The front's entry point: nginx (core dumps off: its memory holds the TLS token's PIN and TLS
# session keys) and a watchdog. libp11 0.4.12 does not log in again when the token host
# restarts: every handshake then fails (TLS alert internal_error) while nginx runs on. So when
# full handshakes fail twice in a row, nginx is stopped and the container exits (75) for its
# restart policy to start a fresh one, which logs in to the new token host.
ulimit -c 0
LISTEN=${SIGNER_FRONT_LISTEN:-127.0.0.1:50051}
ISSUERS=${SIGNER_ISSUERS_LISTEN:-127.0.0.1:8443}
mkdir -p /run/nginx/tmp
# The addresses are the settings chosen at run time (host networking: tests pick free ports).
sed -e "s|listen 127.0.0.1:50051 ssl|listen $LISTEN ssl|" \
    -e "s|listen 127.0.0.1:8443 ssl|listen $ISSUERS ssl|" \
    /etc/signer-front/nginx.conf > /run/nginx/nginx.conf
nginx -c /run/nginx/nginx.conf -p /run/nginx -e stderr &
pid=$!
trap 'kill -QUIT $pid 2>/dev/null' TERM INT QUIT
probe() {
  openssl s_client -brief -connect "$LISTEN" -servername localhost -alpn h2 </dev/null 2>&1 |
    grep -q 'Protocol version: TLSv1.3'
}
sleep "${SIGNER_FRONT_WATCHDOG_GRACE:-5}"
fails=0
while kill -0 $pid 2>/dev/null; do
  if probe; then fails=0; else fails=$((fails + 1)); fi
  if [ $fails -ge 2 ]; then
    echo "signer-front: TLS handshakes fail (token host restarted?); exiting for a restart" >&2
    kill -QUIT $pid 2>/dev/null; wait $pid; exit 75
  fi
  sleep "${SIGNER_FRONT_WATCHDOG_SECONDS:-2}"
done
wait $pid
