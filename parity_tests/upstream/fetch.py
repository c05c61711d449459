"""Finding a release's split module: its wheel fetched from the package index
(``pip download --no-deps``, cached per release), or a source on disk (a .py file, a tree, a
wheel or sdist), searched for the file that defines ``compute_split_seq_index`` and the one
that defines ``class ForwardMode``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile
from typing import Optional

MODULE_MARKER = re.compile(r"^\s*def compute_split_seq_index\b", re.MULTILINE)
FORWARD_MODE_MARKER = re.compile(r"^class ForwardMode\b", re.MULTILINE)
UNREACHABLE = re.compile(r"connection|resolve|network|timed? ?out|max retries|unreachable|"
                         r"could not fetch url|proxy", re.IGNORECASE)


class SourceError(Exception):
    """A release that cannot be fetched, or a source that holds no split module."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable  # the package index could not be reached


def cached_archives(folder: pathlib.Path) -> list:
    """The release archives (wheels, sdists) in a cache folder, sorted; [] without one."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith((".whl", ".tar.gz", ".tgz", ".zip")))


def fetch_release(version: str, cache_dir) -> pathlib.Path:
    """The release's wheel (or sdist) in ``cache_dir/version``, fetched if not there yet."""
    folder = pathlib.Path(os.path.expanduser(cache_dir)) / version
    found = cached_archives(folder)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", f"sglang=={version}", "--no-deps",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-q",
               "-d", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise SourceError(f"pip download sglang=={version} timed out", unreachable=True)
    found = cached_archives(folder)
    if done.returncode != 0 or not found:
        output = (done.stderr + done.stdout).strip().splitlines()
        reason = output[-1] if output else f"pip exited {done.returncode}"
        raise SourceError(f"could not fetch sglang=={version}: {reason}",
                          unreachable=bool(UNREACHABLE.search(done.stderr + done.stdout)))
    return found[0]


def _python_files(path: pathlib.Path):
    """(name, read) for every .py file of a .py file, tree, wheel/zip or sdist; ``read()``
    returns the text. Likely files come first so that a big wheel is read only in part."""
    def likely_first(names):
        return sorted(names, key=lambda n: (not n.endswith(("two_batch_overlap.py",
                                                             "forward_batch_info.py")), n))

    if path.is_file() and path.suffix == ".py":
        yield str(path), path.read_text
    elif path.is_dir():
        for name in likely_first(str(p) for p in path.rglob("*.py")):
            yield name, pathlib.Path(name).read_text
    elif path.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".py")]
            for name in likely_first(names):
                yield name, (lambda n=name: archive.read(n).decode("utf-8", "replace"))
    elif path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as archive:
            members = {m.name: m for m in archive.getmembers() if m.name.endswith(".py")}
            for name in likely_first(members):
                yield name, (lambda n=name: archive.extractfile(members[n]).read().decode(
                    "utf-8", "replace"))
    else:
        raise SourceError(f"{path}: not a .py file, a directory, a wheel or an sdist")


@dataclasses.dataclass(frozen=True)
class Source:
    """The text of a release's split module, and of its ForwardMode's module if found."""

    label: str
    module_path: str
    module_text: str
    forward_mode_path: Optional[str] = None
    forward_mode_text: Optional[str] = None


def read_source(path, label: Optional[str] = None) -> Source:
    """Find the split module (the file defining ``compute_split_seq_index``; a single .py file
    is taken as it is) and the file defining ``class ForwardMode``."""
    path = pathlib.Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    module = forward_mode = None
    fallback = None  # a two_batch_overlap.py without the marker (a function renamed)
    for name, read in _python_files(path):
        base = name.rsplit("/", 1)[-1]
        if module is None or forward_mode is None or base == "forward_batch_info.py":
            text = read()
        else:
            continue
        if module is None and (MODULE_MARKER.search(text) or path.suffix == ".py"):
            module = (name, text)
        elif fallback is None and base == "two_batch_overlap.py":
            fallback = (name, text)
        if FORWARD_MODE_MARKER.search(text) and (forward_mode is None
                                                 or base == "forward_batch_info.py"):
            forward_mode = (name, text)
        if module is not None and forward_mode is not None and \
                forward_mode[0].endswith("forward_batch_info.py"):
            break
    module = module or fallback
    if module is None:
        raise SourceError(f"{path}: no file defines compute_split_seq_index")
    return Source(label or str(path), module[0], module[1],
                  *(forward_mode if forward_mode else (None, None)))
