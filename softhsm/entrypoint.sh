#!/bin/bash
# The token host's entry point: `init` (once, as root, then as the token host's user) and
# `serve` (the default: one p11-kit server per token, core dumps off), `health`.
set -euo pipefail
ulimit -c 0   # RLIMIT_CORE 0, soft and hard, inherited by p11-kit server and p11-kit-remote
umask 077
HSM=/var/lib/signer/hsm                 # volume: tokens/, so.pin, tls-so.pin (this image only)
P11=/run/signer/p11                     # volume shared with the service: p11-kit.sock
P11_TLS=/run/signer/p11-tls             # volume shared with the front: p11-kit-tls.sock
PINS=/run/signer/pins                   # init only: service/user.pin and front/tls.pin
PUBLIC=/run/signer/public               # init only: tls-endpoint.pub.pem for the PKI job
MODULE=/usr/lib/softhsm/libsofthsm2.so
CLIENT=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
HSM_UID=10001 SERVICE_UID=10002 FRONT_UID=10003
TLS_KEY_ID=746c732d656e64706f696e74     # b"tls-endpoint", as signer/_internal/hsm.py
export SOFTHSM2_CONF=/etc/signer-hsm/softhsm2.conf

as_hsm() { setpriv --reuid=$HSM_UID --regid=$HSM_UID --clear-groups --inh-caps=-all "$@"; }
new_pin() { head -c "$1" /dev/urandom | basenc --base64url | tr -d '\n'; }  # no newline: libp11 reads it all
free_slot() {
  as_hsm pkcs11-tool --module $MODULE --list-slots 2>/dev/null |
    awk '/^Slot /{n++} /token state:.*uninitialized/{print n-1; exit}'
}
new_token() {  # label so-file pin-file pin-bytes
  new_pin "$4" > "$2"; new_pin "$4" > "$3"
  local slot; slot=$(free_slot)
  SO=$(cat "$2") as_hsm pkcs11-tool --module $MODULE --slot-index "$slot" --init-token \
    --label "$1" --so-pin env:SO >/dev/null
  SO=$(cat "$2") PIN=$(cat "$3") as_hsm pkcs11-tool --module $MODULE --token-label "$1" \
    --login --login-type so --so-pin env:SO --init-pin --new-pin env:PIN >/dev/null
}

init() {
  [ "$(id -u)" = 0 ] || { echo "init runs as root (it hands each PIN file to its one reader)" >&2; exit 77; }
  if [ -n "$(ls -A $HSM/tokens 2>/dev/null)" ]; then echo "tokens exist in $HSM"; exit 0; fi
  install -d -o $HSM_UID -g $HSM_UID -m 0700 $HSM $HSM/tokens
  install -d -o $SERVICE_UID -g $SERVICE_UID -m 0700 $PINS/service
  install -d -o $FRONT_UID -g $FRONT_UID -m 0700 $PINS/front
  # PINs are made here, written to owner-only files, given to the one process that needs each:
  # user.pin to the service, tls.pin to the front; the SO PINs stay with the tokens.
  new_token signer $HSM/so.pin $PINS/service/user.pin 24
  new_token signer-tls $HSM/tls-so.pin $PINS/front/tls.pin 18   # libp11 0.4.12 reads <= 31 chars
  chown $HSM_UID:$HSM_UID $HSM/so.pin $HSM/tls-so.pin
  chown $SERVICE_UID:$SERVICE_UID $PINS/service/user.pin
  chown $FRONT_UID:$FRONT_UID $PINS/front/tls.pin
  chmod 0400 $PINS/service/user.pin $PINS/front/tls.pin
  # The TLS endpoint's key pair, generated in the TLS token; only its public key comes out.
  PIN=$(cat $PINS/front/tls.pin) as_hsm pkcs11-tool --module $MODULE --token-label signer-tls \
    --login --pin env:PIN --keypairgen --key-type EC:prime256v1 --usage-sign --label tls-endpoint \
    --id $TLS_KEY_ID >/dev/null
  as_hsm pkcs11-tool --module $MODULE --token-label signer-tls --read-object --type pubkey \
    --id $TLS_KEY_ID -o /tmp/tls.der >/dev/null 2>&1
  { echo "-----BEGIN PUBLIC KEY-----"; base64 -w 64 /tmp/tls.der; echo "-----END PUBLIC KEY-----"; } \
    > $PUBLIC/tls-endpoint.pub.pem
  chmod 0644 $PUBLIC/tls-endpoint.pub.pem
  echo "tokens signer and signer-tls in $HSM; user.pin and tls.pin handed over; TLS key generated"
}

serve() {
  [ -n "$(ls -A $HSM/tokens 2>/dev/null)" ] || { echo "no token in $HSM: run init first" >&2; exit 78; }
  rm -f $P11/p11-kit.sock $P11_TLS/p11-kit-tls.sock   # left by a host that was killed
  umask 117   # sockets 0660: owner and the group of the one container that connects
  p11-kit server --foreground --name $P11/p11-kit.sock --provider $MODULE "pkcs11:token=signer" &
  local a=$!
  p11-kit server --foreground --name $P11_TLS/p11-kit-tls.sock --provider $MODULE \
    "pkcs11:token=signer-tls" &
  local b=$!
  trap 'kill -TERM $a $b 2>/dev/null || true' TERM INT
  # p11-kit server makes its socket 0711 (connect needs write): 0660, once each one listens.
  local sock
  for sock in $P11/p11-kit.sock $P11_TLS/p11-kit-tls.sock; do
    for _ in $(seq 200); do [ -S $sock ] && break; sleep 0.05; done
    chmod 0660 $sock
  done
  echo "token host serving unix:path=$P11/p11-kit.sock and unix:path=$P11_TLS/p11-kit-tls.sock"
  local status=0
  wait -n $a $b || status=$?
  kill -TERM $a $b 2>/dev/null || true
  wait || true
  exit $status
}

health() {  # both tokens answer through their sockets, as a client sees them
  P11_KIT_SERVER_ADDRESS=unix:path=$P11/p11-kit.sock pkcs11-tool --module $CLIENT -L 2>/dev/null | grep -q "token label *: signer$"
  P11_KIT_SERVER_ADDRESS=unix:path=$P11_TLS/p11-kit-tls.sock pkcs11-tool --module $CLIENT -L 2>/dev/null | grep -q "token label *: signer-tls$"
}

case "${1:-serve}" in
  init) init ;;
  serve) serve ;;
  health) health ;;
  *) exec "$@" ;;
esac
