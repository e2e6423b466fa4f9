"""The on-bucket format: object bodies, object metadata, the volume descriptor.

Pure: imports nothing from FUSE, trio or boto3. docs/FORMAT.md is the normative description.

Dependency rule: format/ is the bottom library. It imports only the standard library,
``cryptography`` and s3cryptfs.errors / s3cryptfs.limits, never s3cryptfs.keys (nor anything
above: codec, cache, vfs, ops, mount, cli). keys/ may import format/ (one way): what both need,
such as the key envelope, lives here (format/envelope.py).
"""
