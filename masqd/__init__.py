"""masqd: an IP-masquerade manager for container hosts."""

__version__ = "0.1.0"
