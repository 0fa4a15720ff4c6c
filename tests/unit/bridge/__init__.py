"""Unit tests for relay_bridge."""
