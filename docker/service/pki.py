"""The compose stack's development PKI (as `signer run` makes it): a dev CA, the front's
certificate for the TLS key the token host generated, a `dev` client certificate."""

import os
import shutil
from pathlib import Path

from signer._internal.pki import DevCA

ca = DevCA.ensure(Path("/var/lib/signer/pki"))
public = Path("/run/signer/public/tls-endpoint.pub.pem").read_bytes()
server = ca.issue_server(public, ["localhost", "127.0.0.1"])
cert, key = ca.client_files("dev")
if not cert.exists():
    cert, key = ca.issue_client("dev")
front = Path("/etc/signer-front/tls")  # volume front-tls, read by the front
for src, dst in ((server, front / "server.pem"), (ca.cert, front / "ca.pem")):
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
# Bind mount (var/compose/clients, or the tests' directory): the files go to whoever owns it.
clients = Path("/var/lib/signer/clients")
owner = clients.stat()
for src in (ca.cert, cert, key):
    shutil.copyfile(src, clients / src.name)
    os.chown(clients / src.name, owner.st_uid, owner.st_gid)
    (clients / src.name).chmod(0o600 if src.suffix == ".key" else 0o644)
print(f"dev CA ready; front certificate {server}; client certificate dev in {clients}")
