"""The lab: a Shadowplane fleet in network namespaces on one machine (`shadowctl lab up|down|status`).

Kept free of imports: `python -m shadowctl.lab.httpd` and the poller start inside namespaces many times per
test and must start fast.
"""
