"""Whose rows a caller may see: a scope is the accounts it covers, or None for every row (no keys
configured, or an admin's key). A row outside the caller's scope is missing to them: reads raise
the same NotFound as for an id nobody has, lists leave it out, and changes do not reach it."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import ColumnElement, true

Scope = Collection[str] | None


def in_scope(account: str, scope: Scope) -> bool:
    return scope is None or account in scope


def scope_filter(column, scope: Scope) -> ColumnElement[bool]:
    """The WHERE clause that keeps a query to the scope's rows."""
    return true() if scope is None else column.in_(list(scope))
