"""Tests of monedge.proxy."""
