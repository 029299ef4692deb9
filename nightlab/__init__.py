"""nightlab: a research lab that keeps working while its user sleeps."""

__version__ = "0.1.0"
