"""TLS on the worker port: a self-signed certificate made at install, and
its fingerprint, which workers pin (`rc join` prints it in the join command).

No certificate authority is involved: a worker trusts exactly the
certificate whose SHA-256 fingerprint it was given, nothing else.
"""
import datetime
import hashlib
import os

VALID_DAYS = 3650     # a home cluster outlives most certificates; pinning, not expiry, protects it


def paths(config):
    return (os.path.join(config.home, "tls", "cert.pem"),
            os.path.join(config.home, "tls", "key.pem"))


def ensure_certificate(config, common_name="retire-cluster"):
    """Make the key and certificate once; later installs keep them, so the
    fingerprint workers pinned stays valid."""
    cert_path, key_path = paths(config)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .sign(key, hashes.SHA256()))
    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    # Owner-only too: workers pin it by fingerprint, which rc-server and
    # rc-web (the same user) read from it; nobody else needs the file.
    write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))


def write_private(path, data):
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)


def fingerprint(config):
    """SHA-256 of the certificate (DER), as 64 hex digits."""
    import ssl      # in these two only: most `rc` commands never need it (~3 ms)
    with open(paths(config)[0]) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()


def server_context(config):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(*paths(config))
    return context
