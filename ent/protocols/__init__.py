"""
Protocols that carry framed packets over any stream transport (TCP, TLS,
rats-tls): they never know which one they run on.
"""
