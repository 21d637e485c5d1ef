"""
The pure rules: which service a request names (convention), the one
canonical path (paths), per-service policy (policy), the client-side
limits (limits), the error catalogue (errors), the header policy
(headers), whom to trust (trust), value syntax (syntax) and what may be
shown (redact).  No I/O, no reactor: each is a function of its inputs.
"""
