"""gRPC servicers, one per service in proto/muster/v1."""
