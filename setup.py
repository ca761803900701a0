"""Kept for tools that still call ``setup.py``; all metadata lives in ``setup.cfg``.

The one thing setup.cfg cannot say is the optional C accelerator: ``tcp_upper._speedups`` is
built when a C compiler is there, and ``optional=True`` lets the install succeed without one
(tcp_upper/casing.py then uses its pure-Python fallback).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tcp_upper._speedups", ["tcp_upper/_speedups.c"], optional=True)])
