"""Writing what a run keeps (checkpoints, the final model, the reference cache) so that a full or
failing disk loses nothing already saved and says so in one line.

* `replacing(path)`: a file is written under a temporary name beside `path`, fsynced, then renamed
  over it; `staging_dir(out)` does the same for a set of files written by a library into a folder
  (`save_pretrained`). A failed write leaves neither a partial file nor the temporary one.
* `write_error`: what the OS, torch and safetensors raise when a write fails, as one
  `DiskWriteError` line: "No space left on device DEV (mounted at MOUNT) writing PATH (needs ~N MB,
  M MB free)", or the OS's own words for other I/O errors. torch's zip writer swallows the OS error
  and reports "unexpected pos" (`dump_torch` keeps the OS error for it); safetensors words it
  "... No space left on device (os error 28)".
* `warn_if_short`: before a big save, a warning when the disk has less free space than it needs.
* `write_manifest` / `manifest_problem`: every file of a folder with its size and sha256, so a
  reader can tell a truncated or altered file from a good one (checkpoints).

Bottom layer: stdlib, torch, safetensors and `console` only.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from .console import log
from .errors import UserError
from .outputs import pid_alive

MB = 10**6
MANIFEST = "manifest.json"
_OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")  # Rust's io::Error (safetensors); Python's, quoted
# torch's zip writer when fewer bytes reached the file than it wrote: the OS error itself is lost
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskWriteError(UserError, OSError):
    """A write that failed (disk full, quota, I/O error), in one line naming the file: `str()` is
    the message alone, without OSError's "[Errno 28]" prefix."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in `obj` (nested dicts, lists, tuples): what a save of it writes, give or
    take the headers. A DTensor counts whole (its numel is the global one)."""
    import torch  # (here: `directpo demo --help` and the studies' --help load no torch)

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (a folder about to be made lives on its parent's disk)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path) -> int | None:
    try:
        return shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return None


def device_of(path) -> str:
    """The file system `path` is on, as df names it: "/dev/vda (mounted at /)"."""
    mount = _existing(Path(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    source = None
    try:  # the last line for a mount point is the one in effect (mounts stack)
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                source = fields[0]
    except OSError:
        pass
    return f"{source} (mounted at {mount})" if source and source != str(mount) else str(mount)


def _mb(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / MB:.1f}" if n < 10 * MB else f"{n / MB:.0f}"


def warn_if_short(path, needed: int, what: str) -> bool:
    """Log a warning when the disk holding `path` has less free space than `needed` bytes for
    `what`: better said before the save than after it fails. True when there is room (or no way to
    tell)."""
    free = free_bytes(path)
    if free is None or free >= needed:
        return True
    log(f"warning: {what} needs ~{_mb(needed)} MB but {device_of(path)} has {_mb(free)} MB free: the save will "
        "likely fail (nothing saved before it is lost)")
    return False


def _errno_of(e: BaseException) -> int | None:
    """The OS error behind a failed write, however the library that wrote reported it."""
    seen = 0
    while e is not None and seen < 4:  # the error, and what it was raised from
        if isinstance(e, OSError) and e.errno:
            return e.errno
        text = str(e)
        m = _OS_ERROR.search(text)
        if m:
            return int(m.group(1) or m.group(2))
        if "No space left on device" in text:
            return errno.ENOSPC
        if isinstance(e, RuntimeError) and any(s in text for s in _SHORT_WRITE):
            return errno.ENOSPC  # a short write: in practice the disk filled up
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def write_error(e: BaseException, path, needed: int | None = None, note: str = "") -> DiskWriteError | None:
    """`e` (raised while writing `path`) as one line naming the file, the disk and the space, or None
    when `e` is not an I/O error (a bug, a bad value: those keep their own message). `note` is added
    at the end (what was kept)."""
    if isinstance(e, DiskWriteError):
        return e
    code = _errno_of(e)
    if code is None:
        return None
    if code in _NO_SPACE:
        free = free_bytes(path)
        size = f"needs ~{_mb(needed)} MB, {_mb(free)} MB free" if needed else f"{_mb(free)} MB free"
        what = "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded on device"
        text = f"{what} {device_of(path)} writing {path} ({size})"
    else:
        text = f"{os.strerror(code)} writing {path}"
    return DiskWriteError(code, text + note, str(path))


def raise_write_error(e: BaseException, path, needed: int | None = None, note: str = "") -> None:
    """Raise `write_error(e, ...)` from `e` when it is one; else return (the caller re-raises `e`)."""
    err = write_error(e, path, needed, note)
    if err is not None and err is not e:
        raise err from e


def default_mode(path) -> None:
    """The mode an ordinary new file gets (0644 under the usual umask): the temporary files
    safetensors and tempfile make are 0600, which would leave a shared run's weights unreadable."""
    umask = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    if umask is None:  # no /proc: read it the racy way
        umask = os.umask(0o022)
        os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Make a rename or a new file in `path` durable (some file systems cannot: then nothing to do)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path, needed: int | None = None, note: str = ""):
    """Yield a temporary path beside `path` to write; on a clean exit it is fsynced, given the usual
    mode and renamed onto `path` (atomic: readers see the old file or the new one, whole). On any
    error the temporary file goes, and an I/O error is raised as a `DiskWriteError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise_write_error(e, path, needed, note)
        raise
    fsync_dir(path.parent)


class _Recording:
    """The file object torch.save writes into, keeping the OS error of a failed write: torch's zip
    writer swallows it and reports only "unexpected pos". (`name`: a file object's, for whoever
    wraps torch.save, e.g. tests/faults/inject.py.)"""

    def __init__(self, f):
        self.f, self.name, self.error = f, f.name, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()

    def __str__(self) -> str:
        return str(self.name)


def write_text(path, text: str) -> Path:
    """`text` into `path` whole, or not at all (`replacing`): the one atomic writer of small files
    (records, reports, settings)."""
    with replacing(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def dump_torch(obj, path) -> None:
    """torch.save(obj) into `path` (not atomic by itself: write into a temporary folder or under
    `replacing`), raising the OS error itself when torch hides it."""
    import torch

    with open(path, "wb") as f:
        sink = _Recording(f)
        try:
            torch.save(obj, sink)
        except RuntimeError as e:
            if sink.error is not None:
                raise sink.error from e
            raise


@contextlib.contextmanager
def staging_dir(out, needed: int | None = None, note: str = ""):
    """Yield an empty temporary folder inside `out` for a library to save files into (e.g.
    `save_pretrained`); on a clean exit each file is fsynced and renamed into `out`, the data files
    before the small JSON files that describe them (an index names only files already in place).
    On any error the folder goes, nothing in `out` has changed, and an I/O error is raised as one
    `DiskWriteError` line naming `out` (and `note`)."""
    out = Path(out)
    tmp = out / f".tmp-save-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out)
        tmp.mkdir()
        yield tmp
        entries = sorted(tmp.iterdir(), key=lambda p: (p.suffix == ".json", p.name))
        for f in entries:
            if f.is_file():
                fsync_file(f)
                default_mode(f)
            elif (out / f.name).is_dir():  # (a subfolder: replaced whole)
                shutil.rmtree(out / f.name)
        for f in entries:
            os.replace(f, out / f.name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_write_error(e, out, needed, note)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out)


def _remove_abandoned(out: Path) -> None:
    """Staging folders of saves killed mid-write (their process is gone; ours, if left, too)."""
    for old in out.glob(".tmp-save-*"):
        pid = old.name.removeprefix(".tmp-save-")
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory) -> Path:
    """manifest.json in `directory`: every other file in it (subfolders too) with its size and
    sha256. Written after them, so it describes the folder as finished."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    return path


def manifest_problem(directory, hashes: bool = True) -> str | None:
    """What is wrong with `directory` against its manifest, naming the file (None: every file is
    there with its recorded size and, with `hashes`, its recorded sha256). Sizes are checked for
    every file before any is hashed: a truncated file is found without reading the others."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        entries = [(name, int(v["size"]), str(v["sha256"])) for name, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, size, _ in entries:
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            how = "truncated" if actual < size else "longer than when it was written"
            return f"{name} is {how} ({actual} of {size} bytes)"
    if hashes:
        for name, _, digest in entries:
            if file_sha256(directory / name) != digest:
                return f"{name} has changed since it was written (its sha256 differs from {MANIFEST})"
    return None
