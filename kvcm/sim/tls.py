"""HTTPS for `kvcm sim`: `--ssl-certfile`/`--ssl-keyfile`, or `--self-signed-certs`.

The server side is the standard library's `ssl` (TLS 1.2 and newer, the ECDHE AEAD ciphers
llm-d's simulator allows for TLS 1.2). `ssl` cannot make a certificate, so the self-signed one
(RSA, valid ten years, for localhost and 127.0.0.1, as llm-d's simulator makes its own) comes
from the `cryptography` package, written to a private temporary directory that is removed
once loaded.
"""

import datetime
import os
import ssl
import tempfile

_TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                  "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
SELF_SIGNED_KEY_BITS = 2048


def self_signed_pem(hosts=("localhost", "127.0.0.1")):
    """(certificate PEM, private key PEM) of a new self-signed server certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=SELF_SIGNED_KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvcm sim"),
                      x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    alternatives = []
    for host in hosts:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alternatives.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_context(config):
    """The ssl.SSLContext for the configuration, or None without TLS. Raises OSError or
    ssl.SSLError (a missing or bad file)."""
    if not config.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    if config.ssl_certfile:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
        return context
    cert, key = self_signed_pem()
    with tempfile.TemporaryDirectory(prefix="kvcm-sim-tls-") as directory:
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_path, key_path)
    return context
