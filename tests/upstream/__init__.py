"""Tests of monedge.upstream."""
