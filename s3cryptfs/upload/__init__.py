"""The write path: what happens to a file from its first write until it is in S3.

A file being written has a plaintext write-back file (staging), maybe a streamed multipart
upload (stream.py), and, once closed, a sealed version in the journal (journal.py, slots.py)
that the uploader sends (uploader.py); closed files that could not be sealed are kept
(closed.py). docs/ARCHITECTURE.md draws the whole picture. Depends on the object store, the
codec and the read path's types; never on the filesystem core or FUSE.
"""
