"""
Test infrastructure, not on the data path: the namespace topology that the
demo (C{python -m ent demo}), the end-to-end tests and the benchmark build.

May use: anything; nothing in ENT imports it.
"""
