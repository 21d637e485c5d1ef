"""
monedge: a convention-routed edge proxy for Kubernetes, built on Twisted.

A request for ``<host>/<name>/<rest>`` reaches the service
``service.<tier>.<name>`` with no per-service routing configuration.
"""

__version__ = "0.1.0"
