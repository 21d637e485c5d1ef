"""Tests of monedge.edge."""
