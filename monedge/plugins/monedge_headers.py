from monedge.builtin.headers import HeadersHookFactory

headers = HeadersHookFactory()
