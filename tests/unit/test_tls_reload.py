"""The certificate reloader's decisions without a server (the integration suite drives it through real listeners):
what a check reloads, what a failed reload keeps and how often it is logged; a certificate as auth_context."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
from pathlib import Path

import pytest

from ferry.server.security.tls import CertificateReloader, TlsFiles, auth_context, certificate_auth_context
from tests.certs import PKI, Pair, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def live_files(pki: PKI, into: Path) -> TlsFiles:
    shutil.copy(pki.server.cert, into / "server.pem")
    shutil.copy(pki.server.key, into / "server.key")
    shutil.copy(pki.ca, into / "client-ca.pem")
    return TlsFiles(into / "server.pem", into / "server.key", into / "client-ca.pem")


def test_a_check_reloads_only_changed_files(pki: PKI, tmp_path: Path) -> None:
    reloader = CertificateReloader(live_files(pki, tmp_path))
    results: list[bool] = []
    reloader.listeners.append(lambda ok, message: results.append(ok))
    assert not reloader.check()
    fresh = pki.issue_server("fresh")
    shutil.copy(fresh.cert, tmp_path / "server.pem")
    shutil.copy(fresh.key, tmp_path / "server.key")
    assert reloader.check()
    assert reloader.generation == 2
    assert not reloader.check()
    assert results == [True]


def test_a_broken_pair_is_logged_once_and_kept_out(pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reloader = CertificateReloader(live_files(pki, tmp_path))
    before = reloader.context()
    (tmp_path / "server.key").write_bytes(pki.client.key.read_bytes())  # not the certificate's key
    with caplog.at_level("ERROR"):
        for _ in range(5):
            assert not reloader.check()
        (tmp_path / "server.pem").unlink()  # half-way through a copy
        for _ in range(5):
            assert not reloader.check()
    failures = [r.getMessage() for r in caplog.records]
    assert len(failures) == 2, failures
    assert "is not the key of the certificate" in failures[0]
    assert "No such file" in failures[1]
    assert reloader.context() is before and reloader.generation == 1
    shutil.copy(pki.server.cert, tmp_path / "server.pem")
    shutil.copy(pki.server.key, tmp_path / "server.key")
    assert reloader.check()  # whole again
    assert reloader.generation == 2


def test_sighup_reloads_even_unchanged_files(pki: PKI, tmp_path: Path) -> None:
    reloader = CertificateReloader(live_files(pki, tmp_path))
    assert reloader.reload("SIGHUP")
    assert reloader.generation == 2


def test_auth_context_of_a_certificate() -> None:
    info = {
        "subject": ((("organizationName", "Ferry, Inc."),), (("commonName", "ops.internal"),)),
        "subjectAltName": (
            ("DNS", "ops.internal"),
            ("URI", "spiffe://x/ops"),
            ("IP Address", "2001:DB8:0:0:0:0:0:1"),
            ("DirName", "ignored"),
        ),
    }
    found = certificate_auth_context(info, b"\x30\x00")
    assert found["x509_subject"] == [b"CN=ops.internal,O=Ferry\\, Inc."]
    assert found["x509_common_name"] == [b"ops.internal"]
    assert found["x509_subject_alternative_name"] == [b"ops.internal", b"spiffe://x/ops", b"2001:db8::1"]
    assert found["peer_dns"] == [b"ops.internal"]
    assert found["peer_ip"] == [b"2001:db8::1"]
    assert found["peer_spiffe_id"] == found["peer_uri"] == [b"spiffe://x/ops"]
    assert found["x509_pem_cert"][0].startswith(b"-----BEGIN CERTIFICATE-----")
    assert auth_context(None) == {}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_are_not_resumed(pki: PKI, tmp_path: Path, version: ssl.TLSVersion) -> None:
    """Every connection is a full handshake, verified against the client CA in force now."""
    reloader = CertificateReloader(live_files(pki, tmp_path))
    client = ssl.create_default_context(cafile=pki.ca)
    client.maximum_version = version
    client.load_cert_chain(pki.client.cert, pki.client.key)

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=reloader.listener_context())
        port = server.sockets[0].getsockname()[1]

        def connect(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            with client.wrap_socket(raw, server_hostname="localhost", session=session) as sock:
                sock.sendall(b"x")  # TLS 1.3 tickets arrive after the handshake: give them a chance
                sock.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    sock.recv(1)
                return sock.session, sock.session_reused

        first, _ = await asyncio.to_thread(connect, None)
        _, reused = await asyncio.to_thread(connect, first)
        server.close()
        return [reused]

    assert asyncio.run(main()) == [False]


class Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"hello")


def test_a_reloaded_client_ca_decides_new_handshakes(pki: PKI, tmp_path: Path) -> None:
    """The CA is part of the pair a handshake switches to: after the CA file is replaced, a client of the old CA is
    refused and one of the new CA admitted, on the same listener."""
    files = live_files(pki, tmp_path)
    reloader = CertificateReloader(files)

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Hello, "127.0.0.1", 0, ssl=reloader.listener_context())
        port = server.sockets[0].getsockname()[1]

        def admitted(client: Pair) -> bool:
            """Whether the server's protocol was reached (it greets each connection once its handshake is done)."""
            context = ssl.create_default_context(cafile=pki.ca)
            context.load_cert_chain(client.cert, client.key)
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            try:
                with context.wrap_socket(raw, server_hostname="localhost") as sock:
                    return sock.recv(5) == b"hello"
            except (ssl.SSLError, ConnectionResetError):
                return False

        out = [await asyncio.to_thread(admitted, pki.client), await asyncio.to_thread(admitted, pki.other_client)]
        assert files.client_ca is not None
        shutil.copy(pki.other_ca, files.client_ca)
        assert reloader.reload("test")
        out += [await asyncio.to_thread(admitted, pki.client), await asyncio.to_thread(admitted, pki.other_client)]
        server.close()
        return out

    assert asyncio.run(main()) == [True, False, False, True]
