"""Muster: the client SDK and the protocol code shared by server and agent."""
