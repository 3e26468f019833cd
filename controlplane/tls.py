"""TLS between machines: the cluster's certificate authority, the certificates it
issues, and the credentials gRPC and PostgreSQL connections use.

A head whose cluster reaches beyond its machine makes a CA of its own (a random P-256
key, in its session directory) and issues from it the PostgreSQL server's certificate
and its own node's. Every gRPC link is mutual TLS: a server accepts only clients whose
certificate chains to the cluster CA, a client only servers whose certificate does and
names the address it dialled.

**Joining.** A node that joins holds the cluster token and the head's address, nothing
else. From the token both sides derive the same *join CA* (its key is a function of the
token: HKDF-SHA256 to a P-256 scalar), which the head's gRPC server trusts beside the
cluster CA and under which it holds a second certificate, for the name
``JOIN_SERVER_NAME``. The joiner issues itself a bootstrap certificate under the join
CA and dials the head under that name: the handshake succeeds only if each side holds a
key derived from the same token, so the token itself never needs to cross the wire and
a party without it can neither pose as the head nor get past the handshake. Over that
channel the joiner calls ``Join`` with a certificate signing request and gets back its
node certificate (issued by the cluster CA), the CA's certificate and the GCS URL. A
bootstrap certificate is good for ``Join`` alone (``PeerCheck``). Anyone with the token
can derive the join CA; they could join the cluster anyway.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

TLS_DIR = "tls"  # in a node's session directory
CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
JOIN_SERVER_NAME = "cairn-join"  # the name the head's join certificate is for
MODES = ("auto", "on", "off")
_CURVE = ec.SECP256R1()
# the order of P-256's group: a derived scalar must lie in [1, n - 1]
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_FOREVER = datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC)


class TlsError(Exception):
    """A certificate or key is missing, malformed or not the cluster's."""


def wanted(mode: str, *hosts: str) -> bool:
    """Whether TLS is on: ``on``/``off`` as given; ``auto`` when any of ``hosts`` (the
    addresses of the cluster this node takes part in) is not loopback."""
    from controlplane.auth import is_loopback

    if mode not in MODES:
        raise ValueError(f"--tls must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return any(not is_loopback(host) for host in hosts)


# -- keys and certificates ------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str, serial: int) -> bytes:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_EPOCH)
        .not_valid_after(_FOREVER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return cert_pem(builder.sign(key, hashes.SHA256()))


def signing_request(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A CSR for ``key``: the issuer decides which names the certificate holds."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class Authority:
    """A CA: its key and certificate, and the certificates it issues."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: bytes) -> None:
        self.key = key
        self.certificate = certificate
        self._cert = x509.load_pem_x509_certificate(certificate)

    @classmethod
    def create(cls, common_name: str) -> Authority:
        key = new_key()
        return cls(key, _ca_certificate(key, common_name, x509.random_serial_number()))

    @classmethod
    def load(cls, directory: Path) -> Authority:
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
            certificate = (directory / CA_CERT).read_bytes()
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot read the cluster CA in {directory}: {exc}") from None
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key, certificate)

    def save(self, directory: Path) -> None:
        _write_private(directory / CA_KEY, key_pem(self.key))
        (directory / CA_CERT).write_bytes(self.certificate)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        hosts: Iterable[str] = (),
        *,
        server: bool = True,
        client: bool = True,
    ) -> bytes:
        """A certificate for ``public_key``, valid for ``hosts`` (IP addresses or DNS
        names: what a client dialling it checks), for serving and/or calling."""
        usages = [
            *([x509.ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
            *([x509.ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1))
            .not_valid_after(_FOREVER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names = _subject_names(hosts)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return cert_pem(builder.sign(self.key, hashes.SHA256()))

    def issue_for_request(self, csr_pem: bytes, common_name: str, hosts: Iterable[str]) -> bytes:
        """Signs a node's CSR (checked: its signature proves it holds the key)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise TlsError(f"not a certificate signing request: {exc}") from None
        public = csr.public_key()
        if not csr.is_signature_valid or not isinstance(public, ec.EllipticCurvePublicKey):
            raise TlsError("the certificate signing request is not signed by a P-256 key")
        return self.issue(public, common_name, hosts)

    def issued(self, certificate: bytes) -> bool:
        """Whether ``certificate`` (PEM) was issued by this CA."""
        return _issued_by(self.certificate, certificate)


@functools.lru_cache(maxsize=4096)
def _issued_by(ca_pem: bytes, certificate: bytes) -> bool:
    """Cached: a peer's certificate is checked on every call it makes."""
    try:
        cert = x509.load_pem_x509_certificate(certificate)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def join_authority(token: str) -> Authority:
    """The join CA derived from the cluster token (the same for every holder of it)."""
    seed = HKDF(hashes.SHA256(), 32, salt=b"cairn join CA v1", info=b"p256").derive(token.encode())
    scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
    key = ec.derive_private_key(scalar, _CURVE)
    return Authority(key, _ca_certificate(key, "Cairn join CA", serial=1))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


# -- what a node holds --------------------------------------------------------------


@dataclass(frozen=True)
class NodeTls:
    """A node's TLS material: the cluster CA's certificate, the node's certificate and
    key (``<session>/tls``); on the head also the CA's key, to issue certificates."""

    directory: Path

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def cert_path(self) -> Path:
        return self.directory / NODE_CERT

    @property
    def key_path(self) -> Path:
        return self.directory / NODE_KEY

    @classmethod
    def find(cls, session_dir: Path) -> NodeTls | None:
        directory = Path(session_dir) / TLS_DIR
        return cls(directory) if (directory / NODE_CERT).exists() else None

    @classmethod
    def write(cls, session_dir: Path, ca: bytes, cert: bytes, key: bytes) -> NodeTls:
        directory = Path(session_dir) / TLS_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / CA_CERT).write_bytes(ca)
        (directory / NODE_CERT).write_bytes(cert)
        _write_private(directory / NODE_KEY, key)
        return cls(directory)

    @classmethod
    def make_head(cls, session_dir: Path, hosts: Iterable[str]) -> tuple[NodeTls, Authority]:
        """A new cluster CA and the head node's certificate from it."""
        authority = Authority.create("Cairn cluster CA")
        key = new_key()
        cert = authority.issue(key.public_key(), "cairn head", hosts)
        tls = cls.write(session_dir, authority.certificate, cert, key_pem(key))
        authority.save(tls.directory)
        return tls, authority

    def authority(self) -> Authority | None:
        """The CA, where this node holds its key (the head)."""
        return Authority.load(self.directory) if (self.directory / CA_KEY).exists() else None

    def ca(self) -> bytes:
        return self.ca_path.read_bytes()

    def server_credentials(self, join_token: str | None = None) -> grpc.ServerCredentials:
        """Mutual TLS: clients must show a certificate of the cluster CA or, with a
        ``join_token`` (the head), a bootstrap certificate of the join CA, for which
        the server answers with its join certificate (chosen by the name dialled)."""
        pairs = [(self.key_path.read_bytes(), self.cert_path.read_bytes())]
        roots = self.ca()
        if join_token is not None:
            join = join_authority(join_token)
            key = new_key()
            server = join.issue(key.public_key(), JOIN_SERVER_NAME, [JOIN_SERVER_NAME])
            pairs.append((key_pem(key), server))
            roots += join.certificate
        return grpc.ssl_server_credentials(pairs, root_certificates=roots, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca(), self.key_path.read_bytes(), self.cert_path.read_bytes()
        )

    def postgres_params(self) -> dict[str, str]:
        """libpq's (and asyncpg's) parameters for a verified connection with this
        node's certificate."""
        return {
            "sslmode": "verify-full",
            "sslrootcert": str(self.ca_path),
            "sslcert": str(self.cert_path),
            "sslkey": str(self.key_path),
        }


@dataclass(frozen=True)
class Bootstrap:
    """A joiner's credentials for the ``Join`` call: a key, a bootstrap certificate
    under the join CA, and the options that make the channel check the head's join
    certificate."""

    credentials: grpc.ChannelCredentials
    options: tuple[tuple[str, str], ...]

    @classmethod
    def from_token(cls, token: str) -> Bootstrap:
        join = join_authority(token)
        key = new_key()
        cert = join.issue(key.public_key(), "cairn joiner", server=False)
        credentials = grpc.ssl_channel_credentials(join.certificate, key_pem(key), cert)
        return cls(credentials, (("grpc.ssl_target_name_override", JOIN_SERVER_NAME),))


def fingerprint(certificate: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, as hex (for messages and logs)."""
    der = x509.load_pem_x509_certificate(certificate).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


# -- the server's check of its peers ----------------------------------------------------


class PeerCheck(grpc.aio.ServerInterceptor):
    """Lets a call through only if its peer's certificate was issued by the cluster CA;
    a bootstrap certificate (join CA) is good for ``bootstrap_methods`` alone. The TLS
    handshake has already refused certificates of any other CA; this tells the two
    CAs the server trusts apart."""

    def __init__(self, cluster_ca: bytes, bootstrap_methods: Iterable[str]) -> None:
        self._ca = cluster_ca
        self._bootstrap = frozenset(bootstrap_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._bootstrap:
            return handler
        inner = handler.unary_unary
        assert inner is not None, "cairn.Node has unary methods only"

        async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
            peer = context.auth_context().get("x509_pem_cert") or [b""]
            if not _issued_by(self._ca, peer[0]):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "this call needs a node certificate of the cluster CA",
                )
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
