"""The admin API's request bodies (pydantic), shared by the HTTP API, the CLI and /openapi.json.

Kept apart from `proxy.admin.api` so the OpenAPI document can generate their
schemas without importing the admin app (which imports the web layer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from proxy.store.accounts import MAX_CREDITS


class AdminBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(AdminBody):
    id: StrictStr
    credits: StrictInt = 0
    low_balance_threshold: StrictInt | None = Field(None, ge=0, le=MAX_CREDITS)


class TenantUpdate(AdminBody):
    low_balance_threshold: StrictInt | None = Field(None, ge=0, le=MAX_CREDITS)


class Budget(AdminBody):
    credits: StrictInt = Field(ge=0, le=MAX_CREDITS)
    period: Literal["day", "month", "total"] = "total"


class LedgerFold(AdminBody):
    before: StrictInt | StrictFloat | None = Field(None, description="Unix seconds; default: now minus ledger.retention_days.")


class CreditTopUp(AdminBody):
    amount: StrictInt
    idempotency_key: StrictStr | None = None  # default: a fresh one, so the top-up applies


# A key's expiry: a time every formatter can print (up to 9999-12-31T23:59:59Z); milliseconds by mistake are a 400.
LATEST_EXPIRY = 253_402_300_799
UnixSeconds = Annotated[StrictInt, Field(ge=0, le=LATEST_EXPIRY)] | Annotated[StrictFloat, Field(ge=0, le=LATEST_EXPIRY)]


class KeyCreate(AdminBody):
    tenant: StrictStr
    name: StrictStr = Field("", max_length=200)
    models: list[StrictStr] | None = None  # None or empty: every model
    rpm: StrictInt | None = Field(None, ge=1)
    max_concurrency: StrictInt | None = Field(None, ge=1)
    expires_at: UnixSeconds | None = Field(None, description="Unix seconds (until the year 9999).")
    budget: Budget | None = None


class KeyUpdate(AdminBody):
    """PATCH: only the fields sent change; `null` clears a limit, the budget or the expiry."""

    name: StrictStr | None = Field(None, max_length=200)
    models: list[StrictStr] | None = None
    rpm: StrictInt | None = Field(None, ge=1)
    max_concurrency: StrictInt | None = Field(None, ge=1)
    expires_at: UnixSeconds | None = Field(None, description="Unix seconds (until the year 9999).")
    budget: Budget | None = None


# The bodies /openapi.json describes, by component name.
OPENAPI_BODIES: dict[str, type[AdminBody]] = {
    model.__name__: model for model in (TenantCreate, TenantUpdate, CreditTopUp, LedgerFold, KeyCreate, KeyUpdate)
}
