"""Helpers for loraplex's own tests and benchmarks: server launcher, random adapters, fresh
PostgreSQL databases.

Nothing here serves users; it ships in the package so that ``tests/`` and ``bench/`` share it.
"""
