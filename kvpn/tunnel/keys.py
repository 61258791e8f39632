"""Session keys: one ed25519 key pair per ``kvpn connect``, kept in memory only.

The private key never leaves the laptop; the public key (OpenSSH text) goes into the shadow
pod's environment as ``KVPN_AUTHORIZED_KEY``.
"""

from __future__ import annotations

import asyncssh

SESSION_KEY_COMMENT = "kvpn-session"


def new_session_key() -> asyncssh.SSHKey:
    """A fresh in-memory ed25519 private key."""
    return asyncssh.generate_private_key("ssh-ed25519", comment=SESSION_KEY_COMMENT)


def public_key_text(key: asyncssh.SSHKey) -> str:
    """One-line OpenSSH public key (``ssh-ed25519 AAAA... kvpn-session``), no newline."""
    return key.export_public_key("openssh").decode("ascii").strip()


def parse_public_key(text: str) -> asyncssh.SSHKey:
    """Parse an OpenSSH public key line; raises ValueError if it is not one."""
    try:
        return asyncssh.import_public_key(text.strip())
    except asyncssh.KeyImportError as exc:
        raise ValueError(f"not an OpenSSH public key: {exc}") from None
