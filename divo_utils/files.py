"""A run folder's files, without torch (tools/sweep.py and tools/report.py use them too): the lock that gives a folder
one writer, files that are whole or absent, strict JSON, and reading a JSON file back."""

import errno
import json
import os
import socket
import tempfile
from typing import Optional

from divo_utils import LOCK, InputError

try:
    import fcntl  # POSIX file locks: one writer per run folder (on Windows, run folders are not locked)
except ImportError:
    fcntl = None

# Open a run's own files without following a symbolic link: a link would make a run write outside its folder.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_link(path: str) -> None:
    """Stop if `path` (a file of a run's folder) is a symbolic link: nothing outside a run folder is written."""
    if os.path.islink(path):
        raise InputError(f"{path} is a symbolic link (to {os.readlink(path)}); a run's folder holds only its own "
                         f"files, and this one would write through the link: remove {path} and run again")


def try_lock(folder: str) -> tuple[Optional[int], str]:
    """Take the lock of the run `folder` without waiting: (its open file, ""), or (None, the process that holds it).
    The lock lasts while the file stays open (the kernel frees it however the process ends)."""
    refuse_link(os.path.join(folder, LOCK))
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as e:
        refuse_link(os.path.join(folder, LOCK))  # made between the check and the open
        lock = os.path.join(folder, LOCK)
        if os.path.isdir(lock):
            raise InputError(f"{lock} is a directory where the run's lock file goes: remove it (the run's own files "
                             "are beside it) and run again") from e
        raise InputError(f"cannot write {lock} ({e.strerror}): run where the run's folder can be written") from e
    if fcntl is None:
        return fd, ""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    return fd, ""


def lock_run(folder: str) -> None:
    """Lock the run `folder` for this process's whole life, naming this process in the lock file, or stop."""
    fd, holder = try_lock(folder)  # never closed: the lock lasts
    if fd is None:
        raise InputError(f"{folder} is in use by {holder}, which holds {os.path.join(folder, LOCK)}: a run has one "
                         "writer at a time; wait until that process ends, or stop it first")
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())


def write_atomically(path: str, data: bytes, checkpoint: str, replaces: Optional[str] = None) -> None:
    """Write `data` to `path` by renaming a complete copy: a crash never leaves a broken file in place of a good one,
    and a write that fails (a full disk) leaves nothing behind and stops with one line (resume from `checkpoint`).
    `replaces`: a file that describes what `path` held (a run's finished file), removed only once the new copy is
    whole, just before the rename, so that a failed write keeps both old files."""
    tmp = f"{path}.tmp"
    refuse_link(tmp)
    for target in (tmp, path, *((f"{replaces}.tmp",) if replaces else ())):  # the replaced file is written again
        if os.path.isdir(target) and not os.path.islink(target):
            raise InputError(f"could not write {path}: a folder stands at {target}; move or remove that folder, then "
                             f"continue with --resume {checkpoint}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644), "wb") as f:
            f.write(data)
        if replaces:
            remove(replaces, "the results of an earlier step: the run trains on")
        os.replace(tmp, path)  # a link at `path` is replaced, not followed
    except OSError as e:
        if os.path.isfile(tmp) and not os.path.islink(tmp):
            os.remove(tmp)
        fix = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (a quota is full)",
               errno.EFBIG: "free some disk space or raise the file-size limit (ulimit -f)"}.get(
            e.errno, f"make {os.path.dirname(path) or '.'} writable")
        raise InputError(f"could not write {path} ({e.strerror or e}); nothing half-written was left: {fix}, then "
                         f"continue with --resume {checkpoint}") from e


def write_json(path: str, content: dict, checkpoint: str) -> None:
    """Strict JSON (NaN and inf refused, so every file parses anywhere), written atomically."""
    write_atomically(path, json.dumps(content, indent=2, allow_nan=False).encode(), checkpoint)


def read_json(path: str) -> tuple[Optional[dict], str]:
    """The JSON object in `path` and "", or None and what is wrong (missing, not JSON, not an object)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{path} is not readable JSON ({e})"
    if not isinstance(content, dict):
        return None, f"{path} does not hold a JSON object"
    return content, ""


def remove(path: str, why: str) -> None:
    """Remove the file `path` if it is there (a link: the link itself, never its target), and say so."""
    if os.path.isfile(path) or os.path.islink(path):
        os.remove(path)
        print(f"removed {path}, {why}")


def check_writable(folder: str, fix: str) -> None:
    """Stop with `fix` unless files can be made in `folder` (or, if it does not exist yet, where it would be made)."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):  # nothing is created here: the nearest existing folder is tried
        if os.path.exists(existing):
            raise InputError(f"cannot write to {folder}: {existing} is a file, not a folder; {fix}")
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror or e}): {fix}") from e
