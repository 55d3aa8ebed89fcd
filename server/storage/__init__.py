"""Durable state: SQLAlchemy models and the queries each service needs, by concern."""
