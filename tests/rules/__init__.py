"""Tests of monedge.rules."""
