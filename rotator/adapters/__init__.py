"""Adapters: the one place each foreign library (httpx, hvac, vici) is spoken."""
