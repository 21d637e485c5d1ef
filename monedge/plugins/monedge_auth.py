"""
The built-in C{auth} hook's plugin object (see L{monedge.builtin.auth}).
"""

from monedge.builtin.auth import AuthHookFactory

auth = AuthHookFactory()
