"""The on-bucket format: object bodies, object metadata, the volume descriptor.

Pure: imports nothing from FUSE, trio or boto3. docs/FORMAT.md is the normative description.
"""
