"""PeerConfig: the settings of a peer service (inside a KVCache or a standalone `kvtier peer`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from kvtier.config import _PeerSchema, _with_attributes_doc, parse_address
from kvtier.errors import InvalidArgumentError

__all__ = ["PeerConfig", "parse_address"]


@dataclass(frozen=True)
class PeerConfig(_PeerSchema):
    """Settings of a peer service. Every field is checked; a bad value raises InvalidArgumentError
    naming it (``peers.<field>``), the value and what is allowed. The fields, their checks,
    defaults and docs are those of the ``peers`` keys in :mod:`kvtier.config`, which the
    ``peers:`` section of a config file (:class:`kvtier.config.PeersSection`) checks as well;
    this class adds what a running service needs: exactly one of ``secret`` / ``secret_file``,
    and the secret and TLS files readable.
    """

    def _check_together(self) -> None:
        if (self.secret is None) == (self.secret_file is None):
            raise InvalidArgumentError("peers: give exactly one of secret and secret_file")
        if self.secret_file is not None and not os.path.isfile(self.secret_file):
            raise InvalidArgumentError(f"peers.secret_file={self.secret_file!r} is not a file")
        self.tls()  # loads the files: a missing or mismatched one is refused here, naming its key

    def tls(self):
        """The :class:`~kvtier.p2p.transport.TlsSettings` of the ``tls_*`` keys, or None."""
        from kvtier.p2p.transport import TlsSettings

        return TlsSettings.from_config(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)


PeerConfig.__doc__ = _with_attributes_doc(
    PeerConfig.__doc__,
    [(f.name, f.metadata["doc"]) for f in dataclasses.fields(PeerConfig)],
)
