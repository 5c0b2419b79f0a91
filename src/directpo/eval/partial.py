"""`<out>.partial`: what `directpo sample` and `directpo bon` have finished, written as they go, so an
interrupted or failing run (Ctrl-C, a reward function raising after an hour of sampling) loses only
the batch in flight, and a rerun of the same command continues it.

The file: a header line `{"directpo_partial": 1, "settings": {...}, "sampling_batch_size": B}` (what
determines the samples: `run_settings`), then the output's own rows, appended after each sampling
batch (flushed and fsynced) for the prompts that batch completed, each prompt's rows together (its n
samples, or bon's one row). A rerun with the same settings keeps the complete prompts and samples
only the batches that hold the others; the finished run writes all rows in prompt order to `--out`
(atomically) and deletes the partial, so `--out` is byte for byte what an uninterrupted run writes.
A rerun with other settings is refused naming the first that differs; `--overwrite` deletes the
partial and starts over.

Why whole batches again rather than the remaining prompts as a new run: a sample's random numbers
are fixed by its place in the whole run (batch b draws from a generator seeded seed + b,
`eval.sampling`), not by its prompt alone, so a rerun re-forms the run's batches from the same
prompts in the same order and skips those whose prompts are all kept (`sample.draw_resumably`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from ..console import log
from ..diskio import fsync_dir, raise_write_error, replacing, write_text
from ..errors import UserValueError
from ..models import pick_device
from ..outputs import local_path

HEADER = "directpo_partial"
BLOCK = 1 << 16
# Settings that are identities of files rather than flags: how a refusal names them.
_NAMED = {"model_files": "the files of --model", "prompts_file": "the content of --prompts",
          "reward_files": "the files of --reward-model", "device": "the device (--device)", "reward": "the reward"}


def partial_path(out) -> Path:
    return Path(f"{out}.partial")


def identity(path: str | None, whole: bool = False) -> str | None:
    """A cheap identity of the local file or folder `path` names (None: a hub id): sha256 over each
    file's name and size and its content, all of it when `whole` (a prompt file), else its first,
    middle and last 64 KiB (a model folder's top-level files: a retrained or replaced model differs
    there, and a 100 GB folder is read in milliseconds, its copies with new times still match)."""
    p = local_path(path)
    if p is None:
        return None
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if whole:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
                continue
            for at in sorted({0, max(0, size // 2 - BLOCK // 2), max(0, size - BLOCK)}):
                fh.seek(at)
                h.update(fh.read(BLOCK))
    return h.hexdigest()[:16]


def run_settings(model: str, prompts: str, device: str | None, **settings) -> dict:
    """The settings that determine a run's samples: those given (n, seed, temperature, ...), the model
    and the prompts by name and by `identity`, and the device kind (a generator on cuda draws other
    numbers than one on cpu)."""
    out = {"model": model, "model_files": identity(model), "prompts": prompts,
           "prompts_file": identity(prompts, whole=True), "device": pick_device(device).type, **settings}
    return json.loads(json.dumps(out))  # as the header holds them (tuples: lists)


class Partial:
    """The `<out>.partial` of one run. `done`: prompt index -> the JSON lines of its rows, read back
    from an earlier run of the same settings or added by this one (`add`); `batch_size`: the
    sampling batch the kept rows were drawn in (None: nothing kept); `finish` writes `out`."""

    def __init__(self, out, settings: dict, rows_per_prompt: int, overwrite: bool = False):
        self.out, self.path, self.settings, self.per = Path(out), partial_path(out), settings, rows_per_prompt
        self.done: dict[int, list[str]] = {}
        self.batch_size: int | None = None
        self._lock = _lock(self.path, self.out)
        if overwrite and self.path.exists():
            self.path.unlink()
            log(f"--overwrite: deleted {self.path} (an earlier run's samples); starting over")
        elif self.path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        try:
            header = json.loads(lines[0])
            saved = header["settings"]
        except (ValueError, KeyError, TypeError):
            raise UserValueError(f"{self.path} is not a partial output of directpo sample/bon: move it away, or pass "
                                 "--overwrite to start over (it is deleted)") from None
        for k in [*self.settings, *(k for k in saved if k not in self.settings)]:
            if self.settings.get(k) != saved.get(k):
                what = _NAMED.get(k, "--" + k.replace("_", "-"))
                raise UserValueError(f"{self.path} holds samples of another run: {what} was {saved.get(k)!r}, now "
                                     f"{self.settings.get(k)!r}; rerun with the same settings to continue it, or pass "
                                     "--overwrite to start over (it is deleted)")
        self.batch_size = header.get("sampling_batch_size")
        rows: dict[int, list[str]] = {}
        for line in lines[1:-1]:  # (after the last newline: nothing, or a row the end of the run cut off)
            try:
                rows.setdefault(int(json.loads(line)["prompt_index"]), []).append(line)
            except (ValueError, KeyError, TypeError):
                break  # a torn write: what follows it is not trusted
        self.done = {i: r for i, r in rows.items() if len(r) == self.per}
        if sum(map(len, self.done.values())) != len(lines) - 2 or lines[-1]:  # drop the torn tail before appending
            write_text(self.path, "".join(x + "\n" for x in [lines[0], *(y for r in self.done.values() for y in r)]))

    def start(self, batch_size: int) -> None:
        """Begin writing, once the batch the samples are drawn in is known (they depend on it)."""
        self.batch_size = batch_size
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps({HEADER: 1, "settings": self.settings, "sampling_batch_size": batch_size})
                       + "\n")

    def add(self, rows: dict[int, list[dict]]) -> None:
        """Append the rows of prompts just completed ({prompt index: its rows}), durably."""
        lines = {i: [json.dumps(r, ensure_ascii=False) for r in rs] for i, rs in rows.items()}
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(x + "\n" for r in lines.values() for x in r))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise_write_error(e, self.path)
            raise
        self.done.update(lines)

    @contextlib.contextmanager
    def kept(self, total: int):
        """Around the sampling: on an interrupt or an error the partial stays and the log says so (a
        partial with nothing done goes: it would only refuse a rerun with other settings)."""
        try:
            yield
        except BaseException:
            self.release()
            if self.done:
                log(f"{len(self.done)} of {total} prompts done, kept in {self.path}: rerun the same command to "
                    "continue")
            else:
                self.path.unlink(missing_ok=True)
            raise

    def finish(self) -> list[dict]:
        """`out` written whole (the rows in prompt order) and the partial deleted; returns the rows."""
        lines = [x for i in sorted(self.done) for x in self.done[i]]
        with replacing(self.out) as tmp:
            Path(tmp).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        self.path.unlink(missing_ok=True)
        self.release()
        fsync_dir(self.path.parent)
        return [json.loads(x) for x in lines]

    def release(self) -> None:
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None


def _lock(path: Path, out: Path):
    """An exclusive lock on `<out>.partial.lock` for the run's life: two runs appending to one partial
    would interleave their rows (each kept as the other's), so the second is refused."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(f"{path}.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserValueError(f"another run is writing {out} now ({path}.lock is held): wait for it to end, or give "
                             "another --out") from None
    return f
