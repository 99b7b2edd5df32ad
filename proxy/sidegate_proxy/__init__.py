"""Sidegate data plane: the identity-aware PostgreSQL and HTTP proxies and their policy core."""

__version__ = "0.1.0"
