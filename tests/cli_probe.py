"""Helpers for the robustness tests: run the CLI in-process and capture its exit code and stderr, snapshot a file
tree, make directories read-only even for root, and build damaged checkpoints."""

import contextlib
import ctypes
import os
import pickle
import shutil
from pathlib import Path

from vismech.app.cli import main


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``vismech ARGV`` in this process: (exit code, the lines it wrote to stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err.splitlines()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories, the target for links)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        out[str(p)] = (b"->" + os.readlink(p).encode()) if p.is_symlink() else None if p.is_dir() else p.read_bytes()
    return out


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def permissions_apply():
    """Within the block file permissions bind this process even as root (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    are dropped from the effective set, then restored)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = _Header(0x20080522, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    old = data[0].effective
    data[0].effective &= ~0b110
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = old
        libc.capset(ctypes.byref(hdr), data)


class Payload:
    """A pickle that, when loaded, creates ``marker`` (what an attacker's file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('ran')",))


def damaged_checkpoints(root: Path, marker: Path) -> dict[str, Path]:
    """A good tiny LLaVA checkpoint and three damaged copies: truncated and random-bytes model.safetensors, and
    weights that are a malicious pickle (pytorch_model.bin)."""
    from vismech.models.load import load_vlm

    good = root / "ck-good"
    if not good.exists():
        vlm = load_vlm("tiny:llava", device="cpu")
        vlm.model.save_pretrained(good)
        vlm.tokenizer.save_pretrained(good)
    out = {"good": good}
    for name in ("truncated", "random", "pickle"):
        d = root / f"ck-{name}"
        if not d.exists():
            shutil.copytree(good, d)
            w = d / "model.safetensors"
            if name == "truncated":
                w.write_bytes(w.read_bytes()[:1000])
            elif name == "random":
                w.write_bytes(os.urandom(4096))
            else:
                w.unlink()
                (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
        out[name] = d
    return out
