"""Tests of monedge.observe."""
