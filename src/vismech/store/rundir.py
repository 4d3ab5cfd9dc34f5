"""What keeps a run directory safe to write, share and resume: output checks, a lock, checksums, a fingerprint.

- ``output_dir`` checks that a directory can be written (or created) without creating anything, so that a
  refused command leaves nothing behind; its probe has a unique name, so processes may check at once.
- ``Lock`` holds ``OUT/.lock`` (``flock``) for a run's whole life: a second run into the same ``--out`` is refused
  with one line instead of doing all the work again.
- ``Ledger`` keeps the SHA-256 of every file a run writes in its manifest; a resumed run reuses only files whose
  bytes still match and recomputes the rest.
- ``fingerprint`` identifies a checkpoint's weights, config and tokenizer, so that a resumed run never mixes results
  of two different models stored at the same path.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from vismech.errors import UserError

#: files of a checkpoint directory that decide what the model computes (weights, configs, tokenizer)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".jinja", ".tiktoken")
#: larger files are identified by size and the hashes of their first and last MiB (hashing GBs takes too long)
FULL_HASH_BYTES = 256 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` if it is a directory that can be written, or can be created; a one-line ``UserError`` if not.
    Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory; choose a directory for {flag}")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"cannot write to {flag} {path}: {base} is a file; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".vismech-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {base}: {e.strerror}; choose another {flag}") from None
    return path


class Lock:
    """An exclusive ``flock`` on ``DIR/.lock`` (the directory must exist); ``UserError`` if another process holds
    it. The file stays (an empty lock file); the lock goes with the process however it ends."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self.fd: int | None = None
        self.created = False  # whether acquire made the lock file

    def acquire(self) -> "Lock":
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"another vismech run (pid {holder}) is writing to {self.path.parent}; wait for it to "
                            "finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class Ledger:
    """The SHA-256 of every file a run wrote (``checksums`` in the manifest, keyed by the path inside the run
    directory). ``record`` adds one and calls ``flush`` (which rewrites the manifest) before the file is written,
    so a file on disk always has its checksum on disk; ``problem`` says why a stored file cannot be reused."""

    def __init__(self, out: Path, checksums: dict[str, str], flush: Callable[[], None] = lambda: None):
        self.out, self.sums, self.flush = Path(out), checksums, flush

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.out).as_posix()

    def record(self, path: Path, data: bytes) -> None:
        self.sums[self.rel(path)] = sha256(data)
        self.flush()

    def problem(self, path: Path) -> str | None:
        """None when ``path`` holds the bytes recorded for it; else what is wrong, in a few words."""
        rel = self.rel(path)
        if rel not in self.sums:
            return "has no checksum in the manifest"
        if path.is_symlink() or not path.is_file():
            return "is missing" if not path.exists() else "is not a regular file"
        if sha256(path.read_bytes()) != self.sums[rel]:
            return "is damaged (its checksum differs from the manifest's)"
        return None


def fingerprint(path: str | Path) -> dict[str, str]:
    """``{file name: digest}`` of the files of checkpoint directory ``path`` that decide what the model computes
    (``CHECKPOINT_SUFFIXES``; model cards and logs are left out). Files up to ``FULL_HASH_BYTES`` are hashed whole,
    larger ones by size and their first and last MiB."""
    out = {}
    for f in sorted(Path(path).iterdir()):
        if f.name.startswith(".") or f.suffix not in CHECKPOINT_SUFFIXES or not f.is_file():
            continue
        size = f.stat().st_size
        if size <= FULL_HASH_BYTES:
            out[f.name] = sha256(f.read_bytes())
        else:
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(size - (1 << 20))
                out[f.name] = f"size{size}:{sha256(head + fh.read())}"
    return out
