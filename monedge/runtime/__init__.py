"""
Running monedge: listeners, readiness and the drain (lifecycle), the
--workers group (workers), and the admin site (admin).  monedge.tap, the
twistd entry point, sits beside this package.
"""
