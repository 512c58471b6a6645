"""Keys and certificates for a fleet: TLS for the SuperLink, an EC key pair per SuperNode.

Flower's SuperNode authentication needs TLS, so ``edgetune fleet keys --out KEYS --clients K``
writes (with the ``cryptography`` package that Flower depends on; no openssl binary)::

    KEYS/ca.pem, ca.key                 a self-signed CA (EC P-384)
    KEYS/server.pem, server.key         the SuperLink's certificate, for 127.0.0.1, ::1 and localhost
                                        (plus --host names), signed by the CA
    KEYS/clients/client-<i>.key         SuperNode i's private key (EC P-384, OpenSSH format)
    KEYS/clients/client-<i>.pub         its public key; the server registers every *.pub here

Private keys are written with mode 0600. These are for tests and trusted networks: for a real
fleet, use a proper CA and give each device only its own private key.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from ..errors import EdgetuneError
from ..fsutil import atomic_dir

CLIENTS_DIR = "clients"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def new_client_key(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair ``name.key`` (OpenSSH private) and ``name.pub`` in ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(directory / f"{name}.key", priv, private=True)
    _write(directory / f"{name}.pub", pub + b"\n")
    return directory / f"{name}.key", directory / f"{name}.pub"


def generate_keys(out: str | os.PathLike, clients: int, hosts: tuple[str, ...] = (), overwrite: bool = False,
                  days: int = 365) -> Path:
    """Write the CA, the SuperLink certificate and ``clients`` SuperNode key pairs into ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if clients < 0:
        raise EdgetuneError("--clients must be >= 0")
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetune fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetune fleet server")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(later)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    with atomic_dir(out, overwrite) as tmp:
        _write(tmp / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        _write(tmp / "ca.key", pem_key(ca_key), private=True)
        _write(tmp / "server.pem", server.public_bytes(serialization.Encoding.PEM))
        _write(tmp / "server.key", pem_key(server_key), private=True)
        for i in range(clients):
            new_client_key(tmp / CLIENTS_DIR, f"client-{i}")
    return Path(out)


def authorized_keys(keys_dir: str | os.PathLike) -> list[Path]:
    return sorted((Path(keys_dir) / CLIENTS_DIR).glob("*.pub"))


def check_keys_dir(keys_dir: str | os.PathLike) -> Path:
    keys_dir = Path(keys_dir)
    for name in ("ca.pem", "server.pem", "server.key"):
        if not (keys_dir / name).is_file():
            raise EdgetuneError(f"{keys_dir} has no {name}; create it with `edgetune fleet keys --out {keys_dir}`")
    return keys_dir
