"""Where directpo writes: output folders it may safely write into, and the lock that keeps one run
per folder.

    check_output_dir(path, inputs, overwrite, ...)   what may never be written into, checked before
                                                   anything loads: a file; a folder that is, contains
                                                   or lies inside an input (the model, the reference,
                                                   the data: always refused, --overwrite or not); a
                                                   non-empty folder that holds no directpo output
                                                   (refused unless --overwrite)
    RunLock(path)                                  an advisory lock (`flock`) on PATH/.directpo.lock,
                                                   holding the holder's pid, host and start time: a
                                                   second run into the same folder is refused naming
                                                   the holder

Why both: the first guard stops a run replacing a user's own files (a model folder given as its own
output, a project folder with its README.md and config.json); the second stops two runs started
together into one folder from both "succeeding" while one silently replaces the other.

The lock is the kernel's: a process that dies, however, releases it, so a lock file left by a dead
run is taken over (with a log line naming it). A clean release removes the file. A record naming
another host, left in a folder on a shared filesystem, is not taken over: we cannot tell whether
that run is alive, so the message says how to remove it.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from .console import log
from .errors import UserError, UserValueError

LOCK_FILE = ".directpo.lock"
# The files and folders by which a folder is recognised as directpo's own output.
RUN_MARKERS = ("directpo_config.json", "metrics.jsonl", "run_complete.json", "checkpoints", LOCK_FILE)


class OutputDirError(UserError, ValueError):
    """An output folder that must not be written into (one line, names the folder and why)."""


class RunLockedError(UserError, OSError):
    """Another run holds the output folder's lock."""


# ----------------------------------------------------------------------------------------------
# The output folder


def local_path(value: str | None) -> Path | None:
    """The local file or folder a model/data setting names, or None (a hub id, or not given).
    `datasets` sources may carry a `:split` suffix."""
    if not value:
        return None
    for candidate in (value, value.rsplit(":", 1)[0] if ":" in value else None):
        if candidate and os.path.exists(os.path.expanduser(candidate)):
            return Path(os.path.expanduser(candidate))
    return None


def _relation(out: Path, inp: Path) -> str | None:
    """How output folder `out` stands to input `inp`: 'is', 'contains', 'lies inside', or None."""
    o, i = os.path.realpath(out), os.path.realpath(inp)
    if o == i:
        return "is"
    if i.startswith(o.rstrip(os.sep) + os.sep):
        return "contains"
    if o.startswith(i.rstrip(os.sep) + os.sep):
        return "lies inside"
    return None


def holds_output(path: Path, markers=RUN_MARKERS) -> bool:
    """Whether folder `path` holds something directpo wrote (one of `markers`)."""
    return any((path / m).exists() for m in markers)


def user_entries(path: Path) -> list[str]:
    """The names in `path` other than the run lock, sorted (the folder's own content)."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)


def check_output_dir(path: str | Path, inputs: dict[str, str | None], overwrite: bool | None,
                     flag: str = "--output-dir", markers=RUN_MARKERS, what: str = "directpo run") -> None:
    """Refuse an output folder that cannot be written into safely (see the module's docstring).
    `inputs`: {flag: value} of the settings naming what the command reads (hub ids are skipped).
    `overwrite`: the command's --overwrite (None: it has no such flag). `markers`: the names (paths
    relative to the folder) by which a folder is this command's own output."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{flag} {path} is a file, not a folder: give a folder to write into")
    for in_flag, value in inputs.items():
        inp = local_path(value)
        relation = inp is not None and _relation(out, inp)
        if relation:
            raise OutputDirError(f"{flag} {path} {relation} {in_flag} {value}: writing there could replace what the "
                                 "run reads; choose another folder (--overwrite never writes over an input)")
    if out.is_dir() and not overwrite and not holds_output(out, markers):
        entries = user_entries(out)
        if entries:
            shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
            raise OutputDirError(f"{flag} {path} is not empty and holds no {what} ({shown}): choose an empty or new "
                                 "folder" + ("" if overwrite is None else ", or pass --overwrite to write into it "
                                             "(files of the same names are replaced)"))


# ----------------------------------------------------------------------------------------------
# The run lock


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


class RunLock:
    """The lock of one output folder, held from `acquire` to `release` (or the process's end)."""

    def __init__(self, folder: str | Path, command: str = ""):
        self.path = Path(folder) / LOCK_FILE
        self.command = command
        self.file = None
        self.created = False  # `acquire` made the folder: `release` removes it if the run left it empty

    @property
    def held(self) -> bool:
        return self.file is not None

    def acquire(self) -> "RunLock":
        """Make the folder if needed and take its lock, or raise `RunLockedError` naming the holder."""
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(f)
                f.close()
                raise RunLockedError(f"{self.path.parent} is in use by another run ({_describe(holder)}); wait for it "
                                     "to finish, or write to another folder") from None
            # The holder before us may have removed the file between our open and our lock: then
            # we hold a lock on a file nobody else will open. Start again on the file now there.
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        previous = _read(f)
        if previous.get("pid") not in (None, os.getpid()):
            if previous.get("host") not in (None, socket.gethostname()):
                f.close()
                raise RunLockedError(f"{self.path.parent} is locked by a run on another machine ({_describe(previous)}); "
                                     f"if no run is using it, delete {self.path}")
            log(f"taking over the lock of {self.path.parent} from a run that is no longer running "
                f"({_describe(previous)})" + ("" if not pid_alive(previous["pid"]) else " (its pid is now another process)"))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds"),
                            "command": self.command}) + "\n")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so nobody takes a lock on a file about to
        go) and let go. A folder `acquire` made and the run left empty (it failed before writing
        anything) goes too."""
        if self.file is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.file.close()
            self.file = None
        folder = self.path.parent
        if self.created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read(f) -> dict:
    try:
        f.seek(0)
        text = f.read().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# Output files: refused when they exist (unless --overwrite), are an input, or cannot be written,
# before any model is loaded (so nothing is computed, nor any paid judge called, for an output
# that would fail at the end).


def same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None], overwrite: bool) -> None:
    """Each output ({flag: path}, None: not asked for) is neither an input ({flag: path}), nor
    another output, nor a directory, nor an existing file unless `overwrite`, and its folder can
    be written (or made)."""
    seen: list[tuple[str, str]] = []
    for flag, path in outputs.items():
        if not path:
            continue
        for other_flag, other in inputs.items():
            if other and same_file(path, other):
                raise UserValueError(f"{flag} {path} is the {other_flag} input file: write the output elsewhere "
                                     "(--overwrite never replaces an input)")
        for other_flag, other in seen:
            if same_file(path, other):
                raise UserValueError(f"{flag} {path} is also the {other_flag} output: give each output its own file")
        seen.append((flag, path))
        if os.path.isdir(path):
            raise IsADirectoryError(f"{flag} {path} is a directory: give a file name")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{flag} {path} exists: pass --overwrite to replace it")
        _check_writable(flag, path)


def _check_writable(flag: str, path: str) -> None:
    """The folder `path` would be written in (or its nearest existing ancestor, where it would be
    made) accepts writes: a read-only filesystem or a folder without write permission is said now."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        why = "read-only file system" if _read_only(folder) else "no write permission"
        raise PermissionError(f"{flag} {path}: cannot write in {folder} ({why})")


def _read_only(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
