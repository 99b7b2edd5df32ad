"""Sidegate control plane: the kopf operator, admission webhooks and the command line."""

__version__ = "0.1.0"
