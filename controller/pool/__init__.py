"""The Resource Pool Manager: where each service's shadow goes so that every single-host and single-zone
failure finds room, at the lowest price of reserved capacity (placement.py), checked scenario by scenario
by an independent count (coverage.py), beside the alternatives an operator compares it with
(alternatives.py)."""
