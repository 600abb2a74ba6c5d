"""Helpers shared by integration tests (not fixtures: plain functions and classes)."""
