"""
How every ENT command refuses a bad command line: one line on stderr that
names the flag and the value, a pointer to C{--help}, and exit status 2 (as
getopt and argparse tools do), so that the reason is not lost in a page of
usage.
"""

import argparse
import sys

from ent.errors import ConfigurationError

USAGE_STATUS = 2


def usageExit(prog, message):
    """
    Refuse a command line: the one line, then exit with L{USAGE_STATUS}.
    """
    sys.stderr.write(f"{prog}: {message} (see {prog} --help)\n")
    raise SystemExit(USAGE_STATUS)


class ArgumentParser(argparse.ArgumentParser):
    """
    An argparse parser whose errors are one line, not the usage and the line.
    """

    def error(self, message):
        usageExit(self.prog, f"error: {message}")

    def parse_known_args(self, args=None, namespace=None):
        """
        Name an unknown option before a missing required one: with
        C{--bogus} given, "--metrics is required" would send the user to
        the wrong flag.
        """
        required = [a for a in self._actions if a.required and a.option_strings]
        for action in required:
            action.required = False
        try:
            namespace, extras = super().parse_known_args(args, namespace)
        finally:
            for action in required:
                action.required = True
        if not extras:
            missing = [a for a in required if getattr(namespace, a.dest, None) is None]
            if missing:
                self.error(
                    "the following arguments are required: " + ", ".join("/".join(a.option_strings) for a in missing)
                )
        return namespace, extras


def parseNumber(text, what):
    """
    A whole number written in decimal digits (a sign only for "-"); C{int()}
    would also take C{" 80"}, C{"+80"} and C{"8_0"}, typos rather than numbers.
    """
    if isinstance(text, int) and not isinstance(text, bool):  # a default
        return text
    digits = text[1:] if isinstance(text, str) and text.startswith("-") else text
    if not (isinstance(digits, str) and digits.isascii() and digits.isdigit()):
        raise ConfigurationError(f"{what} {text!r} is not a number")
    return int(text)


def parsePort(text, what="port"):
    """
    A TCP port number 1-65535, or a L{ConfigurationError}.
    """
    port = parseNumber(text, what)
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"{what} {port} is out of range 1-65535")
    return port


def _argumentType(check):
    """
    An argparse C{type} from a check that raises L{ConfigurationError};
    argparse puts the flag before its message.
    """

    def convert(text):
        try:
            return check(text)
        except ConfigurationError as e:
            raise argparse.ArgumentTypeError(str(e))

    convert.__name__ = check.__name__
    return convert


def count(minimum, maximum=None):
    """
    An argparse C{type}: a whole number from C{minimum} to C{maximum}.
    """

    @_argumentType
    def number(text):
        n = parseNumber(text, "value")
        if n < minimum or maximum is not None and n > maximum:
            bounds = f"{minimum}-{maximum}" if maximum is not None else f"{minimum} or more"
            raise ConfigurationError(f"value {n} is out of range {bounds}")
        return n

    return number


@_argumentType
def seconds(text):
    """
    An argparse C{type}: a duration in seconds, more than zero.
    """
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(f"value {text!r} is not a number of seconds")
    if not 0 < value < float("inf"):
        raise ConfigurationError(f"value {text!r} is not a duration above 0")
    return value
