"""signer._internal.front: the nginx configuration it writes, and the settings it refuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from signer._internal import config as config_mod
from signer._internal.front import SUBJECT_HEADER, nginx_conf, openssl_conf
from signer.errors import ConfigError


def front_config(tmp_path: Path, **overrides: Any) -> config_mod.Config:
    for name in ("server.pem", "ca.pem", "tls.pin"):
        (tmp_path / name).write_text("x")
    front = config_mod.FrontConfig(
        certificate=str(tmp_path / "server.pem"),
        client_ca=str(tmp_path / "ca.pem"),
        pin_file=str(tmp_path / "tls.pin"),
        server_address="unix:path=/run/hsm/p11-kit-tls.sock",
        upstream="unix:/run/signer/signer.sock",
    )
    return config_mod.Config(front=dataclasses.replace(front, **overrides))


def test_the_key_is_an_engine_uri_with_the_pin_read_from_its_file(tmp_path: Path) -> None:
    text = nginx_conf(front_config(tmp_path), tmp_path)
    pin_file = tmp_path / "tls.pin"
    assert (
        'ssl_certificate_key "engine:pkcs11:pkcs11:token=signer-tls;object=tls-endpoint;'
        f'type=private?pin-source=file:{pin_file}";'
    ) in text
    assert "ssl_verify_client on;" in text
    assert "error_page 495 496 = @unauthenticated;" in text  # refused with a gRPC status
    assert "add_header grpc-status 16 always;" in text
    assert f"grpc_set_header {SUBJECT_HEADER} $ssl_client_s_dn;" in text
    assert "server unix:/run/signer/signer.sock;" in text
    assert "master_process off;" in text
    # Room for the largest Sign message the service accepts.
    assert f"client_max_body_size {2 * 1024 * 1024 + 64 * 1024};" in text


def test_openssl_conf_points_the_engine_at_p11_kit_client_only() -> None:
    text = openssl_conf()
    assert f"MODULE_PATH = {config_mod.P11KIT_CLIENT_MODULE}" in text
    assert "softhsm" not in text.lower()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"certificate": ""}, "front.certificate must be set"),
        ({"client_ca": ""}, "front.client_ca must be set"),
        ({"pin_file": "/nonexistent/tls.pin"}, "front.pin_file: no such file"),
        ({"upstream": "127.0.0.1:5000"}, "front.upstream must be the service's unix:/path"),
        ({"key_uri": "pkcs11:object=x?pin-value=1234"}, "without a PIN in it"),
        ({"key_uri": "/etc/key.pem"}, "must be a pkcs11: URI"),
        ({"upstream": "unix:/run/a b.sock"}, "front.upstream: unsupported characters"),
        ({"listen": "50051"}, "front.listen must be host:port"),
    ],
)
def test_bad_front_settings_are_refused_by_name(
    tmp_path: Path, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        nginx_conf(front_config(tmp_path, **overrides), tmp_path)


def test_a_config_for_another_machine_renders_without_its_files(tmp_path: Path) -> None:
    """The front's image renders nginx.conf at build (docker/front/render.py), where the
    certificate, client CA and PIN file do not exist yet: they arrive as volumes at run time."""
    cfg = front_config(tmp_path, certificate="/etc/tls/server.pem", pin_file="/run/pins/tls.pin")
    with pytest.raises(ConfigError, match=r"front\.certificate: no such file"):
        nginx_conf(cfg, tmp_path)
    text = nginx_conf(cfg, Path("/run/nginx"), check_files=False, error_log="stderr")
    assert "ssl_certificate /etc/tls/server.pem;" in text
    assert "pin-source=file:/run/pins/tls.pin" in text
    assert "error_log stderr warn;" in text
    assert "error.log" not in text
    # Everything else is still checked, and the log's name too.
    with pytest.raises(ConfigError, match=r"front\.upstream must be"):
        nginx_conf(front_config(tmp_path, upstream="x"), tmp_path, check_files=False)
    with pytest.raises(ConfigError, match="error_log: unsupported value"):
        nginx_conf(cfg, tmp_path, check_files=False, error_log="stderr; evil")
    # By default the log is a file in the state directory, as make run wants it.
    assert f"error_log {tmp_path / 'error.log'} warn;" in nginx_conf(
        front_config(tmp_path), tmp_path
    )


def test_the_front_section_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "signer.toml"
    path.write_text('[front]\nlisten = "0.0.0.0:443"\nupstream = "unix:/run/s.sock"\n')
    cfg = config_mod.load(path, env={"SIGNER_FRONT_WORKDIR": "/var/lib/signer/front"})
    assert cfg.front.listen == "0.0.0.0:443"
    assert cfg.front.upstream == "unix:/run/s.sock"
    assert cfg.front.workdir == "/var/lib/signer/front"


def _servers(text: str) -> list[str]:
    """The ``server { ... }`` blocks of an nginx.conf, by brace depth."""
    blocks, depth, start = [], 0, -1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth == 2 and text[:i].rstrip().endswith("server"):
                start = text.rindex("server", 0, i)
        elif ch == "}":
            if depth == 2 and start >= 0:
                blocks.append(text[start : i + 1])
                start = -1
            depth -= 1
    return blocks


def test_without_issuers_listen_there_is_one_server(tmp_path: Path) -> None:
    assert len(_servers(nginx_conf(front_config(tmp_path), tmp_path))) == 1


def test_the_issuers_server_serves_files_only_and_asks_no_certificate(tmp_path: Path) -> None:
    plain = nginx_conf(front_config(tmp_path), tmp_path)
    text = nginx_conf(
        front_config(
            tmp_path, issuers_listen="127.0.0.1:8443", issuers_dir=str(tmp_path / "issuers")
        ),
        tmp_path,
    )
    grpc, public = _servers(text)
    assert grpc == _servers(plain)[0], "the gRPC server must not change"
    assert "listen 127.0.0.1:8443 ssl http2;" in public
    assert "ssl_verify_client off;" in public
    assert f"root {tmp_path / 'issuers'};" in public
    # Nothing in it reaches the service: no upstream, no proxying of any kind.
    for directive in ("grpc_pass", "proxy_pass", "fastcgi_pass", "uwsgi_pass", "scgi_pass"):
        assert directive not in public
    assert "disable_symlinks on;" in public
    assert "location / {\n      return 404;" in public
    # Cached when found; a 404 (an issuer not published yet) is not.
    assert 'add_header Cache-Control "public, max-age=300";' in public
    # A flood from the internet is bounded per address.
    assert "limit_req zone=issuers burst=20 nodelay;" in public
    assert "limit_conn issuers_conn 8;" in public
    assert "limit_except GET { deny all; }" in public
    # Same key, in the token, as the gRPC server's.
    assert public.count("engine:pkcs11:") == 1


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"issuers_listen": "127.0.0.1:8443"}, "front.issuers_dir"),
        ({"issuers_listen": "127.0.0.1:8443", "issuers_dir": "/srv/a b"}, "front.issuers_dir"),
        ({"issuers_listen": "127.0.0.1:50051", "issuers_dir": "/srv/i"}, "front.issuers_listen"),
        ({"issuers_listen": "0.0.0.0:50051", "issuers_dir": "/srv/i"}, "another port"),
        ({"issuers_listen": "127.0.0.1:8\u00b2", "issuers_dir": "/srv/i"}, "host:port"),
        ({"issuers_listen": "127.0.0.1:9\rx", "issuers_dir": "/srv/i"}, "host:port"),
        ({"issuers_listen": "127.0.0.1:0", "issuers_dir": "/srv/i"}, "host:port"),
        ({"issuers_listen": "8443", "issuers_dir": "/srv/i"}, "front.issuers_listen"),
        ({"issuers_listen": "h;x:1", "issuers_dir": "/srv/i"}, "front.issuers_listen"),
        (
            {"issuers_listen": "127.0.0.1:8443", "issuers_dir": "/srv/i", "issuers_max_age": -1},
            "front.issuers_max_age",
        ),
    ],
)
def test_bad_issuers_settings_are_refused_by_name(
    tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        nginx_conf(front_config(tmp_path, **overrides), tmp_path)
