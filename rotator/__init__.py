"""psk-rotator: rotates Cloudflare Magic IPsec pre-shared keys, Vault first."""

__version__ = "0.1.0"
