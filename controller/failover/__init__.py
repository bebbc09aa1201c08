"""Failover: moving a service from a failed primary to a shadow (VIP, DNS)."""
