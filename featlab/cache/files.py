"""Which files an extraction writes, and what it may do with the ones already there.

A single-process cache is written as ``<out>.partial`` and renamed to ``<out>`` when complete.
Under ``torchrun`` with K processes, rank ``r`` writes ``<out>.shards/rank-<r>-of-<K>.h5``
(``.partial`` while incomplete) and rank 0 then writes ``<out>`` as virtual datasets over the
shards. :func:`decide` states the rules of resuming without touching anything (``--dry-run``
reports it) and :func:`prepare` carries them out: a complete ``<out>`` is never overwritten
without ``force``; a partial file is resumed only when its settings equal the new ones, else the
error names the first setting that differs -- unless it holds no sample yet, when it is replaced.
One extraction at a time writes a cache: each of its processes holds an :class:`OutLock`
throughout (rank 0 on ``<out>.lock``, rank ``r`` on ``<out>.rank-<r>.lock``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from featlab.cache import h5file
from featlab.cache import schema as S
from featlab.cache.settings import ExtractSettings
from featlab.cache.verify import recheck_tail
from featlab.errors import CacheError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

__all__ = ["CachePaths", "OutLock", "check_writable", "lock_path", "make_writable_folder",
           "Decision", "decide", "outlook", "prepare", "refuse_complete", "remove_all",
           "remove_finalised_partial", "writer_of", "writers"]

log = logging.getLogger("featlab")

_FIX = "Fix: re-run with the same settings, or --force (force=True) to start over."


@dataclass(frozen=True)
class CachePaths:
    """The files of one cache, seen from one rank.

    Attributes:
        out: the final cache file.
        target: the file this rank completes (``out``, or its shard).
        partial: ``target`` while incomplete.
        shards: folder of the shard files.
        rank, world_size: this rank's place.
    """

    out: str
    target: str
    partial: str
    shards: str
    rank: int = 0
    world_size: int = 1

    @classmethod
    def make(cls, out: str | os.PathLike, rank: int = 0, world_size: int = 1) -> CachePaths:
        out = os.path.abspath(os.fspath(out))
        shards = out + S.SHARDS_SUFFIX
        target = out if world_size == 1 else shard_path(out, rank, world_size)
        return cls(out, target, target + S.PARTIAL_SUFFIX, shards, rank, world_size)

    @property
    def assembling(self) -> str:
        """Temporary name of the virtual main file of a sharded cache while rank 0 writes it."""
        return self.out + S.ASSEMBLING_SUFFIX

    def shard_files(self) -> list[str]:
        return [shard_path(self.out, r, self.world_size) for r in range(self.world_size)]


def shard_path(out: str, rank: int, world_size: int) -> str:
    return os.path.join(out + S.SHARDS_SUFFIX, f"rank-{rank}-of-{world_size}.h5")


def check_writable(out: str | os.PathLike) -> None:
    """Raise :class:`CacheError` unless ``out``'s folder can be created and written (no compute
    has happened yet when this runs)."""
    path = os.path.abspath(os.fspath(out))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise CacheError(_folder_message(path))
    try:
        make_writable_folder(folder)
    except OSError as err:
        raise CacheError(f"`out` must be in a folder featlab can write; got {path} "
                         f"({err.strerror or err}). Fix: choose another --out, or fix the "
                         "folder's permissions.") from err


def _folder_message(path: str) -> str:
    return (f"`out` must be a file path; got the folder {path}. Fix: name the cache file, e.g. "
            "--out caches/r50-voc-val.h5.")


def make_writable_folder(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write and delete a probe file in it (OSError if either
    fails): what a command checks before any compute, whatever it will write there."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".featlab-probe-"):
        pass


class OutLock:
    """An exclusive lock (``flock``) that each process of an extraction holds from before it
    looks at the files already there until it is done with them: a second extraction into the
    same ``out`` -- resuming, or with ``force`` -- would otherwise write the same partial file
    (or delete it) under the first. Rank 0's is ``<out>.lock``, which any run into ``out``
    needs; rank ``r``'s is ``<out>.rank-<r>.lock``, which keeps a rank that outlived its run
    (torchrun starts its workers in sessions of their own) from sharing its shard with the
    next run's rank ``r``; rank 0 also refuses while a rank at or beyond ``world_size`` of an
    earlier run still writes. The holder's pid and host are written into the file for the
    error; the lock goes with the process (killed, it is free again; forked data loader workers
    do not keep it) and the file is removed on :meth:`release`. Where the file system has no
    ``flock``, the run goes on unlocked, with a warning.

    Raises:
        CacheError: another process holds it (or a stray rank's), or its file cannot be made.
    """

    def __init__(self, out: str, rank: int = 0, world_size: int = 1):
        self.path = lock_path(out, rank)
        self._fd: int | None = None
        if fcntl is None:
            log.warning("no flock here: a second extraction into %s would not be refused", out)
            return
        tries = 3  # a --dry-run looking who holds it takes it shared for an instant
        while True:  # the lock must be on the file that is at self.path now (see release)
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno == errno.ESTALE and tries > 1:  # NFS: its holder removed it
                    tries -= 1
                    continue
                if err.errno in _UNSUPPORTED:
                    log.warning("could not lock %s (%s): a second extraction into %s would not "
                                "be refused", self.path, err.strerror or err, out)
                    with contextlib.suppress(OSError):
                        os.remove(self.path)
                    return
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise CacheError(f"the lock file {self.path} must be lockable; flock failed "
                                     f"({err.strerror or err}). Fix: check the file system, or "
                                     "choose another --out.") from err
                tries -= 1
                if tries:
                    time.sleep(0.05)
                    continue
                holder = writer_of(out, rank) or f"its lock file {self.path} is held"
                raise CacheError(_written_by(out, rank, holder) + ".") from None
            try:
                if self._holds(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # released and removed meanwhile by its holder: lock the new one
        self._fd = fd
        _HELD.add(fd)
        try:
            stray = [(r, who) for r, who in (writers(out).items() if rank == 0 else ())
                     if r >= world_size]
            if stray:
                raise CacheError(_written_by(out, *stray[0]) + ".")
            try:
                os.ftruncate(fd, 0)  # the holder's name, for the errors of others
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            except OSError:
                pass  # best effort: a full disk must not stop the run here
        except BaseException:
            self.release()
            raise

    def _open(self) -> int:
        """The lock file, made if needed; a stale one another user left (not writable here) is
        removed once it is shown to be free."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides
            except PermissionError as err:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except OSError:
                    raise CacheError(f"the lock file {self.path} must be writable or removable; "
                                     f"it is not ({err.strerror}). Fix: ask its owner to remove "
                                     "it, or choose another --out.") from err
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return fd  # held: __init__ tries again and names the holder
                try:
                    os.remove(self.path)  # free: left by a run that was killed
                except FileNotFoundError:
                    pass
                finally:
                    os.close(fd)

    def _holds(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then let go of it (a process waiting on the old file then
        finds it gone and locks a new one)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(fd)
        try:
            os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)


_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOLCK}

#: Descriptors of the locks this process holds: a forked child (a DataLoader worker) closes its
#: copies, so that the lock goes with the process that took it.
_HELD: set[int] = set()


def _close_held() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held)


def _written_by(out: str, rank: int, holder: str) -> str:
    part = f" (its rank {rank}'s shard)" if rank else ""
    return (f"{out} must be written by one extraction at a time; another process is writing "
            f"it{part} ({holder}). Fix: wait for it to finish, or stop it (then re-run to resume, "
            "or --force), or choose another --out")


def writers(out: str) -> dict[int, str]:
    """``{rank: "pid N on HOST"}`` of the lock files of ``out`` a live process holds, by rank."""
    ranks = [0] + sorted(int(m.group(1)) for f in glob.glob(glob.escape(out) + ".rank-*"
                                                             + S.LOCK_SUFFIX)
                         if (m := re.search(r"\.rank-(\d+)\.lock$", f)))
    return {r: who for r in ranks if (who := writer_of(out, r)) is not None}


def lock_path(out: str, rank: int = 0) -> str:
    return out + (f".rank-{rank}" if rank else "") + S.LOCK_SUFFIX


def writer_of(out: str, rank: int = 0) -> str | None:
    """``"pid N on HOST"`` of the process holding rank ``rank``'s lock of ``out``, None when
    none does (what ``--dry-run`` notes; nothing is created or changed)."""
    path = lock_path(out, rank)
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                return None
            return os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
        return None  # free: a file left by a killed run
    finally:
        os.close(fd)


def remove_all(paths: CachePaths) -> None:
    """Delete the cache, its partial file and its shards (``force``)."""
    for path in (paths.out, paths.out + S.PARTIAL_SUFFIX, paths.assembling,
                 paths.out + S.PARTIAL_SUFFIX + S.CREATING_SUFFIX,
                 paths.out + S.COMPRESSING_SUFFIX):
        if os.path.lexists(path):
            os.remove(path)
    if os.path.isdir(paths.shards):
        shutil.rmtree(paths.shards)


@dataclass(frozen=True)
class Decision:
    """What an extraction does with the files already at its destination, decided without
    changing anything (:func:`decide`); :func:`prepare` carries it out, ``--dry-run`` reports
    it (:func:`outlook`).

    Attributes:
        remove: ``(file, why)`` of the left-overs deleted first.
        resume: the file resumed (this rank's partial file, or its complete shard), or None
            when a new one is created.
        written: ``resume``'s written flags, less ``dropped``.
        dropped: rows flagged written near the end that do not read back as recorded; they
            are extracted again (R-5.2).
    """

    remove: tuple[tuple[str, str], ...] = ()
    resume: str | None = None
    written: np.ndarray | None = None
    dropped: np.ndarray | None = None


def decide(paths: CachePaths, settings: ExtractSettings) -> Decision:
    """The rules of resuming, read-only (see the module's docstring).

    Raises:
        CacheError: ``out`` is complete already, or a partial file was made with other settings
            (the message names the setting) or another number of processes, or cannot be read.
    """
    remove = []
    if os.path.exists(paths.out):
        refuse_complete(paths.out)
    _check_world_size(paths, settings)
    for left in (paths.partial + S.CREATING_SUFFIX, paths.target + S.COMPRESSING_SUFFIX):
        if os.path.lexists(left):  # a run killed while creating or compressing: made again
            remove.append((left, "left by a run stopped while writing it"))
    for path in (paths.target, paths.partial):
        if not os.path.exists(path):
            continue
        found = h5file.inspect(path)
        diff = found.settings.difference(settings)
        if diff is not None and path == paths.partial and not found.written.any():
            # nothing to lose: a run that failed before its first batch (a data error)
            remove.append((path, f"it held no sample yet, and {diff[0]} differs"))
            break
        if diff is not None:
            raise CacheError(_differs(path, *diff))
        written = found.written
        dropped = recheck_tail(path, written) if path == paths.partial else np.zeros(0, int)
        if dropped.size:
            written = written.copy()
            written[dropped] = 0
        return Decision(tuple(remove), path, written, dropped)
    return Decision(tuple(remove))


def prepare(paths: CachePaths, settings: ExtractSettings) -> tuple[str, np.ndarray] | None:
    """Carry out :func:`decide`: delete the left-overs and return ``(file, written flags)`` of
    this rank's file to resume, or None when it must be created."""
    remove_finalised_partial(paths)  # first: refused or not, the copy goes
    decision = decide(paths, settings)
    for path, why in decision.remove:
        if os.path.lexists(path):
            os.remove(path)
            log.info("removed %s: %s", path, why)
    if decision.dropped is not None and decision.dropped.size:
        bad = decision.dropped
        log.warning("resuming %s: %d written sample(s) near the end (rows %s) do not read back "
                    "as recorded (lost in a crash before they reached the disk?); extracting "
                    "them again", decision.resume, bad.size, ", ".join(map(str, bad[:5].tolist()))
                    + (", ..." if bad.size > 5 else ""))
    return None if decision.resume is None else (decision.resume, decision.written)


def _differs(path: str, flag: str, there: object, now: object) -> str:
    return f"{flag} differs from the partial cache at {path}: {there} there, {now} now. {_FIX}"


def outlook(paths: CachePaths, settings: ExtractSettings, force: bool = False) -> str | None:
    """What extracting into ``paths.out`` would do with the files already there, in one line
    (None: it starts a new cache). For ``--dry-run``: the rules of :class:`OutLock` and
    :func:`decide`, without changing anything."""
    held = writers(paths.out)
    if held:
        return f"the run would be refused: {_written_by(paths.out, *next(iter(held.items())))}"
    if os.path.isdir(paths.out):
        return f"the run would be refused: {_folder_message(paths.out)}"
    if force:
        there = [p for p in (paths.out, paths.partial, paths.shards) if os.path.lexists(p)]
        return (f"--force: the run would delete {', '.join(there)} and start over" if there
                else None)
    try:
        decision = decide(paths, settings)
    except CacheError as err:
        return f"the run would be refused: {err}"
    if decision.resume is not None:
        again, rows = decision.dropped.size, len(decision.written)
        done = int(decision.written.sum()) + again
        redo = (f" ({again} near the end do not read back as recorded and are computed again)"
                if again else "")
        rest = "the rest computed" if done < rows or again else "only finishing it left"
        return (f"the run would resume {decision.resume}: {done} of {rows} samples written"
                f"{redo}, {rest}")
    if any(path == paths.partial for path, _ in decision.remove):
        return f"the run would replace {paths.partial}: it holds no sample yet"
    return None


def remove_finalised_partial(paths: CachePaths) -> None:
    """Delete a partial file that a complete one has replaced: a run stopped between the rename
    of its compressed copy and the removal of the partial file (``h5file.finalize``) leaves
    both. Only a partial with every row written and the complete file's settings is deleted.
    (:func:`decide` looks at the complete file first, so this copy never changes its answer.)"""
    if not (os.path.exists(paths.target) and os.path.exists(paths.partial)):
        return
    try:
        done, left = h5file.inspect(paths.target), h5file.inspect(paths.partial)
    except CacheError:
        return  # not provably a copy of the complete file: left alone
    if done.complete and left.written.all() and left.settings.difference(done.settings) is None:
        os.remove(paths.partial)
        log.warning("removed %s: an uncompressed copy of %s, which is complete (left by a run "
                    "stopped just after finalising)", paths.partial, paths.target)


def refuse_complete(out: str) -> None:
    """Raise the error for a file already at ``out``, saying what it is (featlab only ever
    writes a complete cache there, but a user may point ``out`` at any file)."""
    try:
        complete = h5file.inspect(out).complete
    except CacheError:
        complete = None
    if complete:
        raise CacheError(f"`out` must not be a complete cache unless --force (force=True) is "
                         f"given; {out} exists and featlab never overwrites a cache. Fix: read it "
                         "with featlab.open_cache, choose another --out, or pass --force to "
                         "rebuild it.")
    what = ("is not a featlab cache" if complete is None else
            "is a featlab cache marked incomplete, which featlab never leaves under a final name "
            "(it extracts into <out>.partial)")
    raise CacheError(f"`out` must not be an existing file unless --force (force=True) is given; "
                     f"{out} {what}. Fix: choose another --out, or pass --force to replace it.")


_SHARD = re.compile(r"rank-(\d+)-of-(\d+)\.h5(\.partial)?$")


def _check_world_size(paths: CachePaths, settings: ExtractSettings) -> None:
    k = paths.world_size
    single_partial = paths.out + S.PARTIAL_SUFFIX
    if k > 1 and os.path.exists(single_partial):
        raise CacheError(_world_size_message(single_partial, 1, k))
    others = sorted({int(m.group(2)) for f in glob.glob(os.path.join(paths.shards, "rank-*"))
                     if (m := _SHARD.search(f)) and int(m.group(2)) != k})
    if others:
        raise CacheError(_world_size_message(paths.shards, others[0], k))


def _world_size_message(where: str, there: int, now: int) -> str:
    again = ("as one process (featlab extract without torchrun)" if there == 1 else
             f"under torchrun --nproc_per_node={there} (or nodes x processes = {there})")
    return (f"the number of processes (torchrun world size) differs from the partial cache at "
            f"{where}: {there} there, {now} now. Fix: re-run {again} to resume it, or --force "
            "(force=True) to start over.")
