"""The lab: a Shadowplane fleet in network namespaces on one machine (`python -m lab up|down|status|...`).

A development and demo tool run from a checkout, not part of the installed packages: `lab.procs` puts the
checkout on PYTHONPATH of every process the lab starts, so `python -m lab.httpd` and friends find it.

Kept free of imports: `python -m lab.httpd` and the poller start inside namespaces many times per
test and must start fast.
"""
