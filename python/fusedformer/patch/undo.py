"""The undo log of ff.patch: every change to an object's class or instance attributes, recorded
so that undoing it gives back the object exactly as it was."""

import contextlib

_ABSENT = object()  # marks an instance attribute the object did not have


class UndoLog:
    """Changes are made inside ``with log.changing(obj, ...)``: the log compares each object's
    class and ``__dict__`` before and after, and keeps for every key the patch added, replaced or
    removed its prior value (or that it was absent). ``undo()`` restores exactly those keys and
    classes, newest change first; attributes the patch never touched (``training`` after a later
    ``.eval()``, say) keep their current values."""

    def __init__(self):
        self._changes = []  # (object, prior class, {key: prior value or _ABSENT})

    @contextlib.contextmanager
    def changing(self, *objects):
        before = [(obj, obj.__class__, dict(obj.__dict__)) for obj in objects]
        try:
            yield
        finally:  # also on an exception: whatever was changed half-way is undone with the rest
            for obj, cls, old in before:
                now = obj.__dict__
                prior = {key: old.get(key, _ABSENT) for key in old.keys() | now.keys()
                         if key not in old or key not in now or now[key] is not old[key]}
                if prior or obj.__class__ is not cls:
                    self._changes.append((obj, cls, prior))

    def set(self, obj, **attributes):
        """Set instance attributes, recording what each was before."""
        with self.changing(obj):
            for key, value in attributes.items():
                setattr(obj, key, value)

    def undo(self):
        for obj, cls, prior in reversed(self._changes):
            for key, value in prior.items():
                if value is _ABSENT:
                    obj.__dict__.pop(key, None)
                else:
                    obj.__dict__[key] = value
            obj.__class__ = cls
        self._changes = []
