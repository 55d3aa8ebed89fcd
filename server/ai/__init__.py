"""AI work on the server: model prices, spend budgets and the dispatch gate that holds
an attempt's worst-case cost against every budget it touches."""
