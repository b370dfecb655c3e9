"""MRT pipeline components: the library behind the `mrt` CLI and the Prefect flows (imports no Prefect)."""

__version__ = "0.1.0"
