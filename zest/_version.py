"""The zest version, in a module that imports nothing, so records, deltas and run folders stamp it
without importing the package root (ARCHITECTURE.md §4)."""

__version__ = "0.1.0"
