"""The pure core: graph arithmetic and decisions, with no I/O."""
