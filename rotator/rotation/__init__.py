"""The rotation protocol: ports, a pure plan, step functions and the engine that runs them.

Imports no httpx, hvac, vici or apscheduler.
"""
