"""A real IKE lab: strongSwan charons in network namespaces ("edge" plays Cloudflare, "site" the
customer's router), a traffic probe through the tunnels, and the hooks the simulators and the
``strongswan`` device use. Needs root and Debian's strongSwan packages; ``unavailable()`` says why not."""

from rotator.sim.ike.lab import Lab, LabTunnel, Reauth, attach, probe, sweep_stale, unavailable
from rotator.sim.ike.netns import LabError
from rotator.sim.ike.probe import ProbeResult, TrafficProbe, summary

__all__ = ["Lab", "LabError", "LabTunnel", "ProbeResult", "Reauth", "TrafficProbe", "attach", "probe", "summary",
           "sweep_stale", "unavailable"]
