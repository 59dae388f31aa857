"""Hard-link torch, torchvision and everything they require from one venv into another.

Why: the only torch 2.14.1 wheel pip finds on CI machines is a CUDA build, about 5.5 GB installed with its NVIDIA
libraries. CI's second venv (the newest transformers / TRL / PEFT) needs the same torch, and a second copy has filled
a CI machine's disk. Hard links cost no space; pip unlinks a file before writing one in its place and uninstalls by
unlinking, so neither venv can change the other's files. Afterwards `pip install torch==2.14.1` in the target finds
the requirement already satisfied.

Usage: python .ci/share_torch.py SOURCE_VENV_PYTHON TARGET_VENV_PYTHON
"""

import json
import os
import shutil
import subprocess
import sys

# Runs inside the source venv: the installed files (relative to site-packages) of torch, torchvision and their
# requirements, found through the distributions' metadata, so nothing is listed by hand.
LIST_FILES = r"""
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
seen, todo, files = set(), [("torch", ()), ("torchvision", ())], []
while todo:
    name, extras = todo.pop()
    key = (name.lower().replace("_", "-"), tuple(sorted(extras)))
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            todo.append((req.name, tuple(req.extras)))
    files += [str(f) for f in dist.files or [] if not str(f).startswith("..")]
names = sorted({n for n, _ in seen})
print(json.dumps({"site": [p for p in sys.path if p.endswith("site-packages")][0], "dists": names, "files": files}))
"""


def main(source_python: str, target_python: str) -> None:
    listing = json.loads(subprocess.check_output([source_python, "-c", LIST_FILES]))
    target_site = subprocess.check_output(
        [target_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    ).strip()
    linked = copied = 0
    for rel in listing["files"]:
        src, dst = os.path.join(listing["site"], rel), os.path.join(target_site, rel)
        if not os.path.isfile(src) or os.path.exists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
            linked += 1
        except OSError:  # another filesystem: fall back to a copy
            shutil.copy2(src, dst)
            copied += 1
    print(f"share_torch: {len(listing['dists'])} distributions ({', '.join(listing['dists'])}): "
          f"{linked} files hard-linked, {copied} copied")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
