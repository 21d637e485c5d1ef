"""
Hook plugins.  Every module in a C{monedge/plugins/} directory, here or in
any other entry of C{sys.path} (with no C{__init__.py} there), is searched
for objects providing L{monedge.interfaces.IHookFactory}.  See
docs/hooks.md.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
