"""Tests of monedge.builtin."""
