"""Tests of monedge.registry."""
