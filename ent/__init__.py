"""
ENT: an attested network tunnel for confidential computing, on Twisted.
"""

__version__ = "0.1.0"


def versionLine(command):
    """
    What C{-V}/C{--version} prints for C{command}: one line, as ENG's do.
    """
    return f"{command} (ENT) {__version__}"


def addVersionOption(parser, command):
    """
    Give an argparse C{parser} ENG's C{-V}/C{--version}.
    """
    parser.add_argument(
        "-V", "--version", action="version", version=versionLine(command), help="print the version and exit"
    )
