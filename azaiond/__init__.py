"""azaiond: serves split, encrypted resources and unlocks Docker images on an edge host."""

__version__ = "0.1.0"
