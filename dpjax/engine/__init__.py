"""The sweep engine: programs over masks and items, devices and sharding, compilation, the memory fit, the planner, resume and progress."""
