"""A synthetic source tree for bench/run.py's `tar -xf` and `git` workloads: the same tree for
the same arguments (seeded), shaped like a source checkout. Full size: 2,374 files in about
150 nested directories, about 87 MB, most files 1-20 KiB (log-normal around 6 KB) and a few
files of some MB (data, generated code, binaries) holding most of the bytes.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

EXTENSIONS = [".c", ".h", ".py", ".rs", ".go", ".md", ".txt", ".json", ".js", ".S", ""]
MAX_DEPTH = 6


def make_tree(root: Path, files: int, total_bytes: int, seed: int = 1) -> list[Path]:
    """Writes the tree under *root*; returns its files, sorted."""
    rng = random.Random(seed)
    dirs = [(root, 0)]
    for i in range(max(1, files // 16)):
        parent, depth = rng.choice([d for d in dirs if d[1] < MAX_DEPTH])
        dirs.append((parent / f"dir{i:03d}", depth + 1))
    big = max(1, files // 200)
    sizes = [
        max(64, min(256 * 1024, int(rng.lognormvariate(math.log(6000), 0.9))))
        for _ in range(files - big)
    ]
    # The big files share what the small ones leave of the total (at least 1 MB each).
    weights = [rng.uniform(0.5, 2.0) for _ in range(big)]
    rest = max(big * 1_000_000, total_bytes - sum(sizes))
    sizes += [int(rest * w / sum(weights)) for w in weights]
    rng.shuffle(sizes)
    paths = []
    for i, size in enumerate(sizes):
        directory = rng.choice(dirs)[0]
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"f{i:05d}{rng.choice(EXTENSIONS)}"
        # Random bytes: neither the mount nor rclone compresses, so text would change nothing.
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return sorted(paths)
