"""
ENT: an attested network tunnel for confidential computing, on Twisted.
"""

__version__ = "0.1.0"
