"""Studies: longer measurements that compare methods, run as ``python -m studies.<name>.study``."""
