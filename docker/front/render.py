"""Renders the front's nginx.conf and openssl.cnf for the front's container, at image build,
with signer._internal.front: the code that configures nginx for `make run`. The certificate,
the client CA and the PIN file arrive as volumes when the container starts, so they are not
looked for here (check_files=False); nginx logs to stderr, where the engine collects it."""

import sys
from pathlib import Path

from signer._internal import config
from signer._internal.front import nginx_conf, openssl_conf

TLS = Path("/etc/signer-front/tls")  # volume front-tls: server.pem, ca.pem (the pki job's)
front = config.FrontConfig(
    listen="127.0.0.1:50051",  # docker/front/entrypoint.sh puts SIGNER_FRONT_LISTEN here
    certificate=str(TLS / "server.pem"),
    pin_file="/run/signer/pins/front/tls.pin",  # volume front-pin, 0400, the front's own
    server_address="unix:path=/run/signer/p11-tls/p11-kit-tls.sock",
    client_ca=str(TLS / "ca.pem"),
    upstream="unix:/run/signer/front/signer.sock",
    workdir="/run/nginx",
    # Relying parties' HTTPS: the issuers' files, which the service writes (volume issuers).
    issuers_listen="127.0.0.1:8443",  # docker/front/entrypoint.sh puts SIGNER_ISSUERS_LISTEN here
    issuers_dir="/var/lib/signer/issuers",
)
out = Path(sys.argv[1])
text = nginx_conf(
    config.Config(front=front), Path("/run/nginx"), check_files=False, error_log="stderr"
)
(out / "nginx.conf").write_text(text)
(out / "openssl.cnf").write_text(openssl_conf())
