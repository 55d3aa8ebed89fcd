"""Handing out work: the live agent streams, waking them, and the lease reaper."""
