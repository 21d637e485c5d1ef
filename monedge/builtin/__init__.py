"""
The hooks monedge ships: C{headers}, C{auth} and C{ratelimit}.  Their
plugin objects are in L{monedge.plugins}.
"""
