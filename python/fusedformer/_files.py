"""Results files are written whole or not at all: into a temporary file beside the target, then
renamed over it (atomic on POSIX), so a run killed mid-write never leaves a truncated file where
a good one was. Output paths are checked before any work starts."""

import os


def write_atomic(path, text):
    """Write ``text`` (str or bytes) to ``path`` through a temporary file in the same directory
    and a rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def output_problem(path, kind):
    """Why ``path`` cannot take the output (``kind`` "file" or "directory"), or None. Creates the
    directories it needs, as the writer would."""
    path = os.fspath(path)
    directory = path if kind == "directory" else os.path.dirname(os.path.abspath(path))
    if kind == "file" and os.path.isdir(path):
        return f"{path} is a directory; give a file name"
    if kind == "directory" and os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a directory"
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        return f"cannot create {directory} ({exc.strerror or exc})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    return None
