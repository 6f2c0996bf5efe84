"""The ``saga`` command line: status, lists, graphs, operator actions and migrations."""
