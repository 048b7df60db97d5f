"""
Where librats_tls and its plugins are, checked before the library is
loaded: a library whose plugin directories are missing calls exit(1) when
loaded, so ENT finds them first (the ones compiled into the library, else
beside it) and refuses with a message that says what to install or set.
"""

import os

from ent.errors import RatsTlsLibraryError

#: Where upstream rats-tls installs itself.
DEFAULT_LIBRARY = "/usr/local/lib/rats-tls/librats_tls.so"
UPSTREAM_PLUGIN_DIR = "/usr/local/lib/rats-tls"
PLUGIN_KINDS = ("crypto-wrappers", "tls-wrappers", "attesters", "verifiers")

LIBRARY_ENV = "ENT_RATS_TLS_LIB"
PLUGIN_DIR_ENV = "ENT_RATS_TLS_PLUGIN_DIR"


def missingHelp(path):
    return (
        "point ENT at a complete rats-tls installation with --rats-tls-lib PATH"
        f" or the environment variable {LIBRARY_ENV}"
        f" (and {PLUGIN_DIR_ENV}=DIR if its plugin directories are not beside"
        f" it); the library tried was {path}"
    )


def default_library_path():
    """
    The library ENT loads when not told: C{$ENT_RATS_TLS_LIB}, else upstream's
    install location.
    """
    return os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY


def _usable_dir(path):
    try:
        return any(True for _ in os.scandir(path))
    except OSError:
        return False


def _missing_kinds(base):
    return [kind for kind in PLUGIN_KINDS if not _usable_dir(os.path.join(base, kind))]


def _compiled_plugin_dirs(path):
    """
    The plugin directories compiled into the library, read from its string
    constants (upstream has literals like
    C{"/usr/local/lib/rats-tls/crypto-wrappers/"}); C{None} if not found.

    Reading them is what lets us check the very directories the constructor
    will look at, wherever the library was built to look.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    found = {}
    for kind in PLUGIN_KINDS:
        needle = b"/" + kind.encode()
        start = 0
        while True:
            at = data.find(needle, start)
            if at < 0:
                break
            start = at + 1
            end = at + len(needle)
            if data[end : end + 1] == b"/":
                end += 1
            if data[end : end + 1] != b"\x00":
                continue
            begin = data.rfind(b"\x00", 0, at) + 1
            text = data[begin:end]
            if not text.startswith(b"/") or b"%" in text:
                continue
            if any(c < 0x20 or c > 0x7E for c in text):
                continue
            base = os.fsdecode(data[begin:at])
            found.setdefault(kind, base)
    if len(found) != len(PLUGIN_KINDS):
        return None
    return {kind: os.path.join(found[kind], kind) for kind in PLUGIN_KINDS}


def find_plugin_dir(path, plugin_dir=None):
    """
    Check that the plugin directories C{path}'s library will load exist and
    are not empty; return their parent directory.

    @param plugin_dir: where the plugins are, overriding both the library's
        compiled-in directory and C{$ENT_RATS_TLS_PLUGIN_DIR}.
    @raise RatsTlsLibraryError: if they are missing, since loading the
        library would then kill the process.
    """
    plugin_dir = plugin_dir or os.environ.get(PLUGIN_DIR_ENV)
    if plugin_dir:
        candidates = [plugin_dir]
    else:
        compiled = _compiled_plugin_dirs(path)
        if compiled is not None:
            missing = [d for d in compiled.values() if not _usable_dir(d)]
            if not missing:
                return os.path.dirname(compiled[PLUGIN_KINDS[0]])
            raise RatsTlsLibraryError(
                "rats-tls plugin directories missing or empty: "
                + ", ".join(missing)
                + " (the library would call exit(1) when loaded); install the"
                " rats-tls plugins there, or " + missingHelp(path)
            )
        here = os.path.dirname(path)
        candidates = [os.path.join(here, "rats-tls"), here, UPSTREAM_PLUGIN_DIR]
    for base in candidates:
        if not _missing_kinds(base):
            return base
    base = candidates[0]
    missing = [os.path.join(base, kind) for kind in _missing_kinds(base)]
    raise RatsTlsLibraryError(
        "rats-tls plugin directories missing or empty: "
        + ", ".join(missing)
        + (f" (also looked in {', '.join(candidates[1:])})" if candidates[1:] else "")
        + " (the library would call exit(1) when loaded); install the rats-tls"
        " plugins there, or " + missingHelp(path)
    )
