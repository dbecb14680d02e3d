"""The version of kdcache (recorded in every cache manifest and run)."""

__version__ = "0.1.0"
