"""Dynamic Scaling Controller: shadows' cgroup limits sized from the primary's forecast, ahead of demand."""
