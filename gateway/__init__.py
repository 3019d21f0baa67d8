"""Mail TLS gateway: an edge proxy that owns the TLS of a site's mail servers."""

__version__ = "0.1.0"
