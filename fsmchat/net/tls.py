"""The server's TLS context, from the files the command line names.

Only the set-up lives here; the handshake and every read and write are steps of the connection's
lifecycle (``handshaking``), driven by select like everything else.
"""

from __future__ import annotations

import ssl


class TLSSetupError(Exception):
    """A certificate, key or CA file that cannot be used; the message is for people."""


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A renegotiation could make a write wait to read; the lifecycle never needs to.
    context.options |= ssl.OP_NO_RENEGOTIATION
    for path, option in ((cert, "--tls-cert"), (key, "--tls-key"), (client_ca, "--tls-client-ca")):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise TLSSetupError(f"cannot read {option} {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSSetupError(f"--tls-cert {cert} and --tls-key {key} do not make a usable "
                            f"certificate and key ({exc.reason or exc})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"cannot use --tls-client-ca {client_ca}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
