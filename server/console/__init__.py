"""The read-only web console: an HTTPS listener of its own (``console_addr``), server-
rendered pages of agents, queues, tasks, budgets and the audit trail, for a person signed
in with an ``admin`` or ``viewer`` API token. See docs/console.md.

Nothing here changes anything: every page reads through the storage layer and the
services' read paths, and the only POSTs sign in and out.
"""

from muster.server.console.server import ConsoleServer, start_console

__all__ = ["ConsoleServer", "start_console"]
