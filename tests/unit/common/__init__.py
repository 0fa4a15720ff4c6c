"""Unit tests for relay_common."""
