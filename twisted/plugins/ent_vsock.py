"""
Endpoint string parsers of ENT: C{vsock:CID:PORT} (client) and
C{vsock:PORT} (server), for every option that takes an endpoint string.
"""

from ent.legs.vsock import VsockClientParser, VsockServerParser

vsockClient = VsockClientParser()
vsockServer = VsockServerParser()
