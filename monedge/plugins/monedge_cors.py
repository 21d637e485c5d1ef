from monedge.builtin.cors import CorsHookFactory

cors = CorsHookFactory()
