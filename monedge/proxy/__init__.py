"""
The proxy exchange: the Resource tree that routes each request lazily by
the naming convention (resource), and the exchange that sends it upstream
and streams the answer back (exchange).
"""
