"""The TLS listener against Mozilla's "intermediate" configuration, as sslyze checks it: TLS 1.2
and 1.3 only, their recommended cipher suites and curves, no compression, renegotiation done
securely, extended master secret, TLS_FALLBACK_SCSV, and a certificate that validates.

sslyze is no dependency of ferroxy's (it pins its own ``cryptography``): the test runs it from
this interpreter if it imports it, else from PATH, and skips when neither has it. ``.ci/run``
installs it in a virtualenv of its own."""

from __future__ import annotations

import datetime
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HOST
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ferroxy import Proxy, TlsConfig

SERVER_NAME = "localhost"


def sslyze_command() -> list[str]:
    if importlib.util.find_spec("sslyze") is not None:
        return [sys.executable, "-m", "sslyze"]
    if found := shutil.which("sslyze"):
        return [found]
    pytest.skip("sslyze is not installed (pip install sslyze, or put its `sslyze` on PATH)")


def write_certificates(directory: Path) -> tuple[Path, TlsConfig]:
    """A CA and a leaf for SERVER_NAME that meet the profile: ECDSA P-256 signed with
    SHA-256, 90 days (the profile allows at most 366), and extensions that sslyze's strict
    path validation accepts. trustme's leaves fail it: their subjectAltName is critical
    although their subject is not empty, which RFC 5280 forbids."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferroxy sslyze test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=89))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, TlsConfig(cert=cert_file, key=key_file)


def test_tls_listener_meets_mozilla_intermediate(
    tmp_path: Path, ferroxy_upstream, ferroxy_proxy
) -> None:
    command = sslyze_command()
    ca_file, tls = write_certificates(tmp_path)

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    App.tls = tls
    proxy = ferroxy_proxy(App)
    scan_file = tmp_path / "scan.json"
    done = subprocess.run(
        [
            *command,
            "--mozilla_config=intermediate",
            "--certinfo_ca_file",
            str(ca_file),
            "--json_out",
            str(scan_file),
            # The name the certificate covers, at the address the proxy listens on.
            f"{SERVER_NAME}:{proxy.port}{{{HOST}}}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = done.stdout + done.stderr
    # sslyze also exits 0 when it could not connect at all: the verdict line is the proof.
    assert done.returncode == 0, report
    assert f"{SERVER_NAME}:{proxy.port}: OK - Compliant." in report, report

    # What the verdict rests on, as the scan saw it: TLS 1.2 and 1.3 served, nothing older.
    (server,) = json.loads(scan_file.read_text())["server_scan_results"]
    scan = server["scan_result"]
    supported = {
        version
        for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3")
        if scan[f"{version}_cipher_suites"]["result"]["is_tls_version_supported"]
    }
    assert supported == {"tls_1_2", "tls_1_3"}
    tls13 = scan["tls_1_3_cipher_suites"]["result"]["accepted_cipher_suites"]
    assert {suite["cipher_suite"]["name"] for suite in tls13} == {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    }
