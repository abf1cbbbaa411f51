"""The long campaign: ``make campaign`` (``python -m tests.campaign``).

Runs for ROTATOR_CAMPAIGN_SECONDS (default 1200) with the fault classes of ROTATOR_CAMPAIGN_FAULTS
(default: the suite's, ``DEFAULT_FAULTS``; ``all`` for every class), prints the seed first, then the checks made and the violations found.
Exit status 0 when no violation, traceback or leaked key was found, 1 otherwise.
"""

from __future__ import annotations

import sys
import time

from tests.campaign.harness import Campaign, from_env


def main() -> int:
    args = from_env(default_seconds=1200.0)
    print(f"campaign: seed {args['seed']} (ROTATOR_CAMPAIGN_SEED to replay), {args['seconds']:.0f}s, "
          f"{args['tunnels']} tunnels, faults {','.join(args['faults'])}", flush=True)
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {line}", flush=True)

    result = Campaign(**args, log=progress).run()
    print(result.report(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
