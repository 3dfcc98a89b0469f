"""The admin API and the tenants/keys CLI."""
