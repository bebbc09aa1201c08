"""Controller replicas: the distributed configuration store (DCS) they share and the leadership held in it."""
