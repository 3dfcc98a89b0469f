"""The Redis store, the hot-path script client, accounts, and their Lua scripts."""
