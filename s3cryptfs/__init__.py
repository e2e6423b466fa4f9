"""s3cryptfs: an S3 bucket mounted as a folder, every object encrypted on the client."""

__version__ = "0.1.0"
