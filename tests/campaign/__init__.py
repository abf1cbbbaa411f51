"""The fault campaign (issue 9): real rotator processes, hostile simulators, a continuous invariant monitor."""
