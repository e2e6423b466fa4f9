"""The kernel's view of mounts: FUSE options we refuse."""

from __future__ import annotations

from s3cryptfs.errors import ConfigError

# A setuid file or a device node from the bucket would take effect: anyone who can write to
# the bucket could plant one. libfuse mounts nosuid,nodev unless these are asked for.
REFUSED_OPTIONS = ("suid", "dev")


def check_fuse_options(options: list[str]) -> None:
    """Refuse mount options that would give files from the bucket privileges."""
    for option in options:
        name = option.partition("=")[0].strip()
        if name in REFUSED_OPTIONS:
            raise ConfigError(
                f"mount option {name} is refused: anyone who can write to the bucket could "
                "plant setuid programs or device nodes (s3cryptfs mounts are nosuid,nodev)"
            )
