"""Tests of monedge.runtime."""
