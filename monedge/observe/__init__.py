"""
What the edge writes as it answers: Prometheus metrics (metrics) and the
JSON access log (accesslog), both read from each request's record.  The
admin site that serves them is runtime's.
"""
