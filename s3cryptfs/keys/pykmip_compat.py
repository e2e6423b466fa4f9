"""The parts of PyKMIP we use, imported once here.

PyKMIP 0.11 still calls SQLAlchemy's pre-2.0 ``declarative_base`` when ``kmip`` is imported (its
server's object store, which a client never uses); SQLAlchemy 2 answers with a deprecation
warning on every import. It says nothing about our use, so it is silenced for this import only.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kmip.core import enums
    from kmip.pie import exceptions as pie_exceptions
    from kmip.pie.client import ProxyKmipClient
    from kmip.services.kmip_client import KMIPProxy
    from kmip.services.kmip_protocol import RequestLengthMismatch

KmipOperationFailure = pie_exceptions.KmipOperationFailure

__all__ = [
    "KMIPProxy",
    "KmipOperationFailure",
    "ProxyKmipClient",
    "RequestLengthMismatch",
    "enums",
    "pie_exceptions",
]
