"""
Services: what twistd runs, at the top of ENT: the agent (C{twistd enta},
L{ent.services.agent}), the gateway (C{twistd entg},
L{ent.services.gateway}), the socket relay (C{twistd ent-relay},
L{ent.services.socketrelay}), their command-line options
(L{ent.services.options}) and the wiring the twistd plugins call
(L{ent.services.app}).

May use: every other layer.  Nothing below imports a service, and no service
imports another: only L{ent.services.app} builds them.
"""
