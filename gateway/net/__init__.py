"""The network edge below the sessions: binding listening sockets (`bind`), the accept loop
(`accept`), the PROXY protocol header (`proxy_protocol`, sans-IO, and `proxy_stream`, which
reads one off a new connection) and the lean socket stream of the hot path (`sockstream`).

Nothing is imported here, so importing one module of the package does not load the others.
"""
