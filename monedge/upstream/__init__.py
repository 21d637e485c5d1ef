"""
The upstream side: the HTTP/1.1 client and its pool (client), endpoint
choice (balancer), client endpoints and upstream TLS (endpoints), the
WebSocket upgrade (upgrade), two-way tunnels (tunnel), bodies that may be
sent again (replay) and request bodies that stream (streaming).
"""
