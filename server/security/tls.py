"""TLS for both listeners: the server's certificate and key (and, for mTLS, the CA client certificates must chain
to), loaded into ``ssl.SSLContext`` objects for Ferry's transport and the HTTP port and into grpc credentials for
``--transport grpcio``, reloaded without a restart; and a peer certificate as gRPC's ``auth_context()`` mapping.

Settings: TLS 1.2 at least; ALPN ``h2`` on the gRPC port (RFC 9113 §3.2: HTTP/2 over TLS is chosen by ALPN, and
grpc clients insist on it), ``http/1.1`` on the HTTP port; with a client CA, a client certificate is required
(``CERT_REQUIRED``: a client without one, or with one that does not chain to the CA, fails the handshake, so it
never reaches a handler). Sessions are not resumed, so every connection is verified against the CA in force
(a client certificate whose CA was rotated out cannot come back on a resumed session); gRPC clients keep their
connections, so a full handshake per connection costs little.

Reload (:class:`CertificateReloader`): on ``SIGHUP`` (:meth:`~CertificateReloader.reload`, which app.py calls) and
when one of the files' inode, size or modification time changes (:meth:`~CertificateReloader.check`, every
``check_interval_s``), the files are loaded into new contexts; if that fails (a PEM that does not parse, a key that
does not match the certificate, a file missing half-way through a copy), the old pair stays and the reason is
logged. A change seen while the files are being written (their stat differs before and after the load) is not
taken: the next check loads them whole.

How a listener takes the new pair without giving up its socket: the ``SSLContext`` a listener was created with
(:meth:`~CertificateReloader.listener_context`) is a front: its SNI callback, which OpenSSL runs on every
ClientHello (with ``server_name`` None when the client sent no SNI), sets the connection's context to the newest
one (``SSLObject.context = ...``, OpenSSL's ``SSL_set_SSL_CTX``) before the certificate is chosen, the client
certificate verified or ALPN selected. So each handshake uses the pair that was current when it began, a
connection already open keeps the one it was made with, and the listening socket is never closed or rebound (no
window where connections are refused, nothing to race with the drain). The cost is one attribute compare per
handshake. grpcio has its own mechanism for the same: ``grpc.dynamic_ssl_server_credentials``, whose fetcher grpc
calls before every handshake and which here returns the new configuration once after each reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ferry.client.errors import InvalidArgument

log = logging.getLogger("ferry.server.security.tls")

GRPC_ALPN = ("h2",)
HTTP_ALPN = ("http/1.1",)

AuthContext = dict[str, list[bytes]]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the server's TLS material is: PEM files. ``cert`` may hold intermediates after the leaf."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    """CA certificates (PEM) a client certificate must chain to; None: no client certificate is asked for."""

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


def server_context(files: TlsFiles, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context for ``files``, offering ``alpn``. Raises ``ssl.SSLError`` or ``OSError`` when a file cannot
    be read, does not parse, or the key does not match the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # No session resumption (no TLS 1.2 or 1.3 tickets): each connection is a full handshake, verified against the
    # client CA in force now; a resumed session would carry an identity past a CA rotation.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    context.load_cert_chain(files.cert, files.key)  # checks that the key is the certificate's
    if files.client_ca is not None:
        context.load_verify_locations(cafile=files.client_ca)
        if not context.get_ca_certs():
            raise ssl.SSLError(f"{files.client_ca} holds no CA certificate")
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(alpn))
    return context


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One loaded generation of the files: a context per ALPN list and the bytes grpcio's credentials take."""

    generation: int
    contexts: dict[tuple[str, ...], ssl.SSLContext]
    cert_chain: bytes
    key: bytes
    client_ca: bytes | None

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert_chain)], self.client_ca)


Signature = tuple[tuple[int, int, int], ...]


class CertificateReloader:
    """The server's TLS material, reloaded on :meth:`reload` (SIGHUP) and when the files change (:meth:`check`,
    every ``check_interval_s`` once :meth:`start` ran). Raises ``InvalidArgument`` at construction when the files
    cannot be loaded: a server must not start without the TLS it was asked for."""

    def __init__(self, files: TlsFiles, check_interval_s: float = 5.0) -> None:
        self.files = files
        self.check_interval_s = check_interval_s
        self.listeners: list[Callable[[bool, str], None]] = []
        """Called after each reload attempt with (succeeded, what happened): the audit log hooks in here."""
        self._alpns: set[tuple[str, ...]] = {GRPC_ALPN, HTTP_ALPN}
        self._task: asyncio.Task[None] | None = None
        self._failed: Signature | None = None  # files that failed to load: not tried again until they change
        try:
            self._current = self._load(1)
            self._signature = self._stat()
        except (OSError, ssl.SSLError, ValueError) as err:
            raise InvalidArgument(f"cannot load the TLS certificate and key: {_why(err, files)}") from None

    @property
    def generation(self) -> int:
        """1 for the pair loaded at start, one more for each successful reload."""
        return self._current.generation

    @property
    def requires_client_certificate(self) -> bool:
        return self.files.client_ca is not None

    def _stat(self) -> Signature:
        """The files' (inode, size, mtime); ``()`` when one is missing (being replaced, or gone)."""
        out = []
        for path in self.files.paths():
            try:
                st = os.stat(path)
            except OSError:
                return ()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _load(self, generation: int) -> _Loaded:
        files = self.files
        cert_chain, key = files.cert.read_bytes(), files.key.read_bytes()
        client_ca = files.client_ca.read_bytes() if files.client_ca is not None else None
        contexts = {alpn: server_context(files, alpn) for alpn in self._alpns}
        return _Loaded(generation, contexts, cert_chain, key, client_ca)

    def context(self, alpn: Sequence[str] = GRPC_ALPN) -> ssl.SSLContext:
        """The newest context for this ALPN list (what the next handshake on such a listener uses)."""
        return self._current.contexts[tuple(alpn)]

    def listener_context(self, alpn: Sequence[str] = GRPC_ALPN) -> ssl.SSLContext:
        """A context to create a listener with: each handshake on it switches to the newest pair (module docstring).
        A later reload loads contexts for this ALPN list too."""
        key = tuple(alpn)
        if key not in self._alpns:
            self._alpns.add(key)
            self._current.contexts[key] = server_context(self.files, key)
        front = server_context(self.files, key)

        def newest(connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            current = self._current.contexts[key]
            if connection.context is not current:
                connection.context = current

        front.sni_callback = newest
        return front

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """grpcio's server credentials for these files, following reloads (grpc calls the fetcher before each
        handshake; it answers the new configuration once per reload and None, "no change", otherwise)."""
        served = self._current.generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            current = self._current
            if current.generation == served:
                return None
            served = current.generation
            return current.grpc_configuration()

        return grpc.dynamic_ssl_server_credentials(
            self._current.grpc_configuration(), fetch, require_client_authentication=self.requires_client_certificate
        )

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Load the files again; on failure keep the pair in use and log why. Returns whether the new pair is in
        use."""
        try:
            before = self._stat()
            loaded = self._load(self._current.generation + 1)
            after = self._stat()
        except (OSError, ssl.SSLError, ValueError) as err:
            self._failed = self._stat()
            message = f"TLS reload ({reason}) failed, keeping the certificate in use: {_why(err, self.files)}"
            log.error("%s", message)
            self._notify(False, message)
            return False
        if before != after:
            log.info("TLS reload (%s): the files changed while being read; trying again at the next check", reason)
            return False
        self._current, self._signature, self._failed = loaded, after, None
        message = f"TLS reload ({reason}): certificate {self.files.cert} in use for new connections"
        log.info("%s (generation %d)", message, loaded.generation)
        self._notify(True, message)
        return True

    def check(self) -> bool:
        """Reload if the files changed since the last load (or the last failed attempt); whether a new pair is in
        use."""
        signature = self._stat()
        if signature in (self._signature, self._failed):
            return False
        return self.reload("the files changed")

    def _notify(self, ok: bool, message: str) -> None:
        for listener in self.listeners:
            try:
                listener(ok, message)
            except Exception:
                log.exception("a TLS reload listener failed")

    def start(self) -> None:
        """Check the files every ``check_interval_s`` on the running loop, until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="ferry-tls-reload")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                self.check()
            except Exception:  # a bug here must not end the watching
                log.exception("checking the TLS files failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _why(err: BaseException, files: TlsFiles) -> str:
    """What went wrong, in words an operator can act on (OpenSSL says "PEM lib" for a file it cannot read)."""
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError):
        return f"{err.strerror}: {err.filename}" if err.filename else str(err)
    reason = getattr(err, "reason", None) or str(err)
    if reason == "KEY_VALUES_MISMATCH":
        return f"the key {files.key} is not the key of the certificate {files.cert} (KEY_VALUES_MISMATCH)"
    if reason == "PEM_LIB" or "PEM lib" in str(err):
        for path in (files.cert, files.client_ca):
            if path is not None and not _certificates_load(path):
                return f"{path} holds no certificate that can be read (PEM)"
        return f"the key {files.key} cannot be read (PEM, unencrypted)"
    return str(reason)


def _certificates_load(path: Path) -> bool:
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError):
        return False
    return True


def certificate_auth_context(info: dict[str, Any], der: bytes) -> AuthContext:
    """A verified peer certificate as gRPC's auth_context properties, with grpc-core's names and value forms: the
    subject (RFC 2253) and its CN, every DNS, URI, email and IP subject alternative name (together, and each kind as
    ``peer_dns`` / ``peer_uri`` / ``peer_email`` / ``peer_ip``), a SPIFFE ID when the one URI SAN is one, and the
    certificate in PEM. ``info`` is ``SSLObject.getpeercert()``'s dict, ``der`` its ``binary_form=True``."""
    out: AuthContext = {}
    subject: tuple[tuple[tuple[str, str], ...], ...] = info.get("subject", ())
    if subject:
        out["x509_subject"] = [_rfc2253(subject).encode()]
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    if names:
        out["x509_common_name"] = [names[-1].encode()]
    out["x509_pem_cert"] = [ssl.DER_cert_to_PEM_cert(der).encode()]
    sans: list[bytes] = []
    uris: list[bytes] = []
    for kind, value in info.get("subjectAltName", ()):
        key = _PEER_PROPERTY.get(kind)
        if key is None:
            continue
        text = ipaddress.ip_address(value).compressed if kind == "IP Address" else str(value)
        sans.append(text.encode())
        out.setdefault(key, []).append(text.encode())
        if kind == "URI":
            uris.append(text.encode())
    if sans:
        out["x509_subject_alternative_name"] = sans
    if len(uris) == 1 and uris[0].lower().startswith(b"spiffe://"):
        out["peer_spiffe_id"] = uris
    return out


_PEER_PROPERTY = {"DNS": "peer_dns", "URI": "peer_uri", "email": "peer_email", "IP Address": "peer_ip"}
_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _rfc2253(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """A subject as OpenSSL prints it with XN_FLAG_RFC2253 (what grpc-core reports): last RDN first."""

    def escape(value: str) -> str:
        value = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
        if value[:1] in ("#", " "):
            value = "\\" + value
        return value[:-1] + "\\ " if value.endswith(" ") else value

    return ",".join(
        "+".join(f"{_SHORT.get(key, key)}={escape(value)}" for key, value in rdn) for rdn in reversed(subject)
    )


def auth_context(ssl_object: ssl.SSLObject | None) -> AuthContext:
    """A connection's auth_context (contract C1), as grpc.aio gives it: empty without TLS; under TLS
    ``transport_security_type: [b"ssl"]``, ``security_level``, ``ssl_session_reused``, ``ssl_tls_version``; with a
    verified client certificate also its properties (:func:`certificate_auth_context`)."""
    if ssl_object is None:
        return {}
    out: AuthContext = {
        "transport_security_type": [b"ssl"],
        "security_level": [b"TSI_PRIVACY_AND_INTEGRITY"],
        "ssl_session_reused": [b"true" if ssl_object.session_reused else b"false"],
    }
    version = ssl_object.version()
    if version:
        out["ssl_tls_version"] = [version.encode()]
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        info = ssl_object.getpeercert()  # a dict only for a verified certificate (mTLS); {} otherwise
        if info:
            out.update(certificate_auth_context(dict(info), der))
    return out


__all__ = [
    "GRPC_ALPN",
    "HTTP_ALPN",
    "AuthContext",
    "CertificateReloader",
    "TlsFiles",
    "auth_context",
    "certificate_auth_context",
    "server_context",
]
