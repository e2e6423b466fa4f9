"""``mount.s3cryptfs``: the helper mount(8) runs for fstab entries of type ``s3cryptfs``.

    s3://bucket/prefix  /mnt/x  s3cryptfs  _netdev,nofail,config=/etc/s3cryptfs/x.toml  0 0

mount(8) calls ``mount.s3cryptfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]``. Options that belong
to mount(8) or systemd are dropped, options named like s3cryptfs settings become flags, and the
rest are passed to FUSE with ``-o``. The helper returns once the mount is ready (or failed), as
mount(8) expects.
"""

from __future__ import annotations

import sys

from s3cryptfs.options import BY_NAME, IN_FILE, Kind

# Understood by mount(8), systemd's fstab generator or the fstab format itself, not by us.
_DROP_EXACT = {"_netdev", "nofail", "auto", "noauto", "user", "users", "nouser", "defaults", "rw"}
_DROP_PREFIX = ("x-systemd.", "x-", "comment=")
# Every key of the configuration file that is a flag (not the two positional arguments nor -o,
# which mount(8) gives in their own way), and config=FILE.
_FLAGS = {
    o.name: o for o in IN_FILE.values() if o.option_strings and o.kind is not Kind.LIST
} | {"config": BY_NAME["config"]}


def translate(source: str, mountpoint: str, options: list[str]) -> list[str]:
    """The ``s3cryptfs mount`` arguments for one mount(8) invocation."""
    args = ["mount", source, mountpoint]
    fuse: list[str] = []
    for opt in options:
        if not opt or opt in _DROP_EXACT or opt.startswith(_DROP_PREFIX):
            continue
        if opt == "ro":
            args.append("--read-only")
            continue
        name, eq, value = opt.partition("=")
        key = name.replace("-", "_")
        option = _FLAGS.get(key)
        if option is not None:
            flag = option.flag
            if option.kind is Kind.BOOL:
                if eq and value.lower() not in ("1", "true", "yes"):
                    continue
                args.append(flag)
            else:
                if not eq:
                    raise SystemExit(f"mount.s3cryptfs: option {name} needs a value ({name}=...)")
                args += [flag, value]
            continue
        fuse.append(opt)
    if fuse:
        args += ["-o", ",".join(fuse)]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    fake = verbose = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):
            options += argv[i + 1].split(",")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options += a[2:].split(",")
        elif a == "-t" and i + 1 < len(argv):
            i += 2  # our own type name
            continue
        elif a.startswith("-") and len(a) > 1:
            fake = fake or "f" in a[1:]  # -f: fake (do everything but mount)
            verbose = verbose or "v" in a[1:]
            # -s (sloppy) and -n (no mtab) need nothing from us
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        print(
            "usage: mount.s3cryptfs s3://BUCKET[/PREFIX] MOUNTPOINT [-sfnv] [-o OPTIONS]",
            file=sys.stderr,
        )
        return 2
    args = translate(positional[0], positional[1], options)
    if verbose or fake:
        print("s3cryptfs " + " ".join(args), file=sys.stderr)
    if fake:
        return 0
    from s3cryptfs.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
