"""The rotation protocol: ports, a pure plan, step functions and the engine that runs them.

How it is organised (docs/design.md section 4):

- ``ports.py``: what the protocol speaks through (TunnelApi, RecordStore, Device, Health).
- ``plan.py``: pure. Listing + records + policies + clock -> Plan: who is due (a fresh key), who
  is pending (resume forward), who is rolling back (resume backward), who drifted, who is refused.
- ``steps.py``: one function per step, each ``(ctx, items) -> Result(moved, settled, back, halt)``.
  ``FORWARD`` = stage, validate, deliver, apply, verify, check_health, promote;
  ``BACKWARD`` (taking a key back, Vault first) = mark_rolling_back, restore_cloudflare,
  restore_device, unstage. Adding a step is one function and one line in a list.
- ``engine.py``: runs the plan's items through the lists in batches, records every outcome in one
  tally (which redacts reasons against the run's keys), and owns the lease guard.
- ``pipeline.py``: optional executor that stages the next batch and promotes the previous one
  while a batch is at Cloudflare.
- ``lease.py``: per-account leases.

Imports no httpx, hvac, vici or apscheduler (tests/rotation/test_architecture.py checks).
"""
