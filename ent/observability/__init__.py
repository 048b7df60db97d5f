"""
Observability: the counters the data path adds to (L{ent.observability.stats}),
and what reads them: the Prometheus endpoint (C{--metrics}), JSON log lines
(C{--log-format json}) and C{python -m ent status}.

The data path only adds integers here; the readers never sit on it.

May use: the shared basics, and the legs (the metrics endpoint listens on
one).
"""
