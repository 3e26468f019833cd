"""The node daemon: local scheduler, worker pool and object table of one node."""
