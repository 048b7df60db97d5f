"""
Log lines that a stranger can cause, at most once per interval per key.

A refused connection, a dropped frame to a new destination: each is
counted always, and logged only when its key (a source, a destination, a
reason) has not been logged within the interval.  The table of keys is
bounded, so a flood of new keys costs memory up to the bound and then is
counted without being logged.
"""


class OncePer:
    """
    Whether to log an event of C{key} now: at most once per C{interval}
    seconds per key, for at most C{maxKeys} keys at a time.
    """

    def __init__(self, clock, interval=60.0, maxKeys=4096):
        self.clock = clock
        self.interval = interval
        self.maxKeys = maxKeys
        self._last = {}

    def __call__(self, key):
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if last is None and len(self._last) >= self.maxKeys:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            if len(self._last) >= self.maxKeys:
                return False
        self._last[key] = now
        return True

    def __len__(self):
        return len(self._last)
