"""Lua scripts of the accounts (tenants, credits) and the prelude every credit script includes."""
