"""vismech's version: recorded in every run's manifest, printed by ``vismech --version``."""

__version__ = "0.1.0"
