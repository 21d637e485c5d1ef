"""
The edge: the client side of the wire.  The HTTP site, channel and
request with monedge's limits (server), and the --tls-dir certificate
store for TLS listeners (tls).
"""
