"""grpc.aio server interceptors, one concern per module (metrics, auth, identity).

Each wraps the method handler through :mod:`muster.server.interceptors._wrap` to see the
call's context and outcome, which a bare ``ServerInterceptor`` cannot.
"""
