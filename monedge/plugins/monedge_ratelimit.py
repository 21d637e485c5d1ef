"""
The built-in C{ratelimit} hook's plugin object (see
L{monedge.builtin.ratelimit}).
"""

from monedge.builtin.ratelimit import RateLimitHookFactory

ratelimit = RateLimitHookFactory()
