"""Unit tests for relay_router."""
