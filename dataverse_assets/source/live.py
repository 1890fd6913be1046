"""A real Dataverse org over HTTPS with OAuth client credentials, and the client session every
networked source opens (the simulator's too)."""

import functools
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
from pydantic import Field

from dataverse_assets.errors import (
    AuthenticationError,
    DataverseError,
)
from dataverse_assets.source.auth import (
    DEFAULT_REFRESH_AFTER_SECONDS,
    SHARED_TOKENS,
    ClientCredentials,
)
from dataverse_assets.source.base import DataverseSource, SourceSession
from dataverse_assets.source.budget import LocalBudget, budget_key, file_budget
from dataverse_assets.source.client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_RESPONSE_DEADLINE_SECONDS,
    DataverseClient,
    Page,
    RetryPolicy,
)
from dataverse_assets.source.query import PageQuery, string_literal

METADATA_SELECT = "LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled"
# AttributeTypeName too: a multi-select choice's AttributeType is "Virtual", only its type
# name says what it is (an export that skips Virtual attributes drops them).
ATTRIBUTE_SELECT = "LogicalName,AttributeType,AttributeTypeName,DisplayName,Description"
# Per kind of attribute the entity has: the typed-cast request and what it selects. Choices
# expand their option set (a global set comes as GlobalOptionSet).
ATTRIBUTE_DETAILS = {
    "Picklist": ("PicklistAttributeMetadata", "LogicalName", "OptionSet,GlobalOptionSet"),
    "MultiSelectPicklist": ("MultiSelectPicklistAttributeMetadata", "LogicalName",
                            "OptionSet,GlobalOptionSet"),
    "State": ("StateAttributeMetadata", "LogicalName", "OptionSet,GlobalOptionSet"),
    "Status": ("StatusAttributeMetadata", "LogicalName", "OptionSet,GlobalOptionSet"),
    "Boolean": ("BooleanAttributeMetadata", "LogicalName", "OptionSet,GlobalOptionSet"),
    "Lookup": ("LookupAttributeMetadata", "LogicalName,Targets", None),
    "DateTime": ("DateTimeAttributeMetadata", "LogicalName,Format,DateTimeBehavior", None),
}
# The AttributeType (or AttributeTypeName) values each typed cast covers.
_DETAIL_KIND = {"Picklist": "Picklist", "MultiSelectPicklistType": "MultiSelectPicklist",
                "MultiSelectPicklist": "MultiSelectPicklist", "State": "State",
                "Status": "Status", "Boolean": "Boolean", "Lookup": "Lookup",
                "Customer": "Lookup", "Owner": "Lookup", "DateTime": "DateTime"}
# Dataverse stops counting at 5000 (`@odata.count` says 5000 and the limit annotation is set).
COUNT_LIMIT = 5000
COUNT_LIMIT_EXCEEDED = "@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"


class ClientSession(SourceSession):
    """A session over the HTTP client (live Dataverse or the simulator)."""

    def __init__(self, client: DataverseClient) -> None:
        self.client = client
        self.stats = client.stats
        self._logical_names: dict[str, str] = {}  # entity set -> table, from metadata
        self._organization_payload: dict | None = None
        self._set_names: dict[str, str | None] = {}  # table -> entity set, lookup targets

    async def entity_definition(self, entity_set: str) -> dict | None:
        _, payload = await self.client.get_json(
            "EntityDefinitions",
            params={
                "$select": METADATA_SELECT,
                "$filter": f"EntitySetName eq {string_literal(entity_set)}",
                "$expand": f"Attributes($select={ATTRIBUTE_SELECT})",
            },
            entity=entity_set,
        )
        definitions = payload.get("value") or []
        if definitions and definitions[0].get("LogicalName"):
            self._logical_names[entity_set] = definitions[0]["LogicalName"]
        return definitions[0] if definitions else None

    async def attribute_metadata(self, entity_set: str, definition: dict) -> dict | None:
        """One typed-cast request per kind of attribute the entity has (choices with their
        option sets, lookups with their targets, dates with their behaviour), the set names
        of the lookups' targets, and the org's base language (once per session)."""
        logical = definition.get("LogicalName")
        if not isinstance(logical, str):
            return None
        kinds = []
        for attribute in definition.get("Attributes") or []:
            if not isinstance(attribute, dict):
                continue
            type_name = attribute.get("AttributeTypeName")
            type_name = type_name.get("Value") if isinstance(type_name, dict) else None
            kind = _DETAIL_KIND.get(type_name or "") or _DETAIL_KIND.get(
                attribute.get("AttributeType") or "")
            if kind and kind not in kinds:
                kinds.append(kind)
        raw: dict = {"organization": await self._organization()}
        base = f"EntityDefinitions(LogicalName={string_literal(logical)})/Attributes"
        for kind in ATTRIBUTE_DETAILS:
            if kind not in kinds:
                continue
            cast, select, expand = ATTRIBUTE_DETAILS[kind]
            params = {"$select": select, **({"$expand": expand} if expand else {})}
            _, raw[kind] = await self.client.get_json(
                f"{base}/Microsoft.Dynamics.CRM.{cast}", params=params, entity=entity_set)
        targets = sorted({target for item in (raw.get("Lookup") or {}).get("value") or []
                          if isinstance(item, dict)
                          for target in item.get("Targets") or [] if isinstance(target, str)})
        if targets:
            raw["EntitySets"] = await self._entity_sets(targets, entity_set)
        return raw

    async def _organization(self) -> dict:
        if self._organization_payload is None:
            _, self._organization_payload = await self.client.get_json(
                "organizations", params={"$select": "languagecode"}, entity="organizations")
        return self._organization_payload

    async def _entity_sets(self, logical_names: list[str], entity: str) -> dict:
        """LogicalName -> EntitySetName of lookup targets, in requests of 20 names."""
        found = [name for name in logical_names if name in self._set_names]
        missing = [name for name in logical_names if name not in self._set_names]
        for start in range(0, len(missing), 20):
            names = missing[start:start + 20]
            _, payload = await self.client.get_json("EntityDefinitions", params={
                "$select": "LogicalName,EntitySetName",
                "$filter": " or ".join(f"LogicalName eq {string_literal(n)}" for n in names),
            }, entity=entity)
            for item in payload.get("value") or []:
                if isinstance(item, dict) and isinstance(item.get("LogicalName"), str):
                    self._set_names[item["LogicalName"]] = item.get("EntitySetName")
            found += names
        return {"value": [{"LogicalName": name, "EntitySetName": self._set_names.get(name)}
                          for name in sorted(found) if self._set_names.get(name)]}

    def iter_pages(self, entity_set: str, query: PageQuery,
                   start_url: str | None = None) -> AsyncIterator[Page]:
        return self.client.iter_pages(entity_set, query, start_url)

    async def entity_set_names(self) -> list[str]:
        """From the service document; [] if it cannot be read (suggestions are optional)."""
        try:
            _, service = await self.client.get_json("", entity="service document")
        except (DataverseError, AuthenticationError):
            return []
        items = service.get("value")
        return [str(item["name"]) for item in items if isinstance(item, dict) and item.get("name")
                ] if isinstance(items, list) else []

    async def get_record(self, entity_set: str, record_id: str,
                         select: tuple[str, ...] = ()) -> tuple[str, bytes, dict]:
        return await self.client.get_record(entity_set, record_id, select)

    def iter_pages_in_ranges(self, entity_set: str, query: PageQuery, primary_key: str,
                             ranges: int) -> AsyncIterator[Page]:
        return self.client.iter_pages_in_ranges(entity_set, query, primary_key, ranges)

    async def count(self, entity_set: str, filter: str | None = None,
                    primary_key: str | None = None) -> int | None:
        """`$count=true` with `$top=1` (one row, no paging). Past Dataverse's count limit of
        5000, a whole table's size comes from RetrieveTotalRecordCount (a recent snapshot,
        close enough for an ETA); a filtered count that large is unknown (None)."""
        params = {"$count": "true", "$top": "1"}
        if primary_key:
            params["$select"] = primary_key
        if filter:
            params["$filter"] = filter
        _, payload = await self.client.get_json(entity_set, params=params, entity=entity_set)
        count = payload.get("@odata.count")
        if not isinstance(count, int):
            return None
        if not payload.get(COUNT_LIMIT_EXCEEDED) and count < COUNT_LIMIT:
            return count
        logical_name = self._logical_names.get(entity_set)
        if filter or not logical_name:
            return None
        _, payload = await self.client.get_json(
            "RetrieveTotalRecordCount(EntityNames=@tables)",
            params={"@tables": f"[{string_literal(logical_name)}]"}, entity=entity_set)
        counts = payload.get("EntityRecordCountCollection") or {}
        totals = dict(zip(counts.get("Keys") or [], counts.get("Values") or [], strict=False))
        total = totals.get(logical_name)
        return total if isinstance(total, int) and total >= count else None


def shared_ssl_context() -> ssl.SSLContext:
    """One verifying TLS context per process (per SSL_CERT_FILE / SSL_CERT_DIR), as httpx
    would build it: loading the CA bundle costs 25-50 ms, and every fetch session would
    otherwise load it again."""
    return _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context(verify=True, trust_env=True)


@asynccontextmanager
async def _client_session(
    *, org_url: str, client_id: str, client_secret: str, authority: str, tenant_id: str | None,
    max_concurrency: int, timeout_seconds: float, transport: httpx.AsyncBaseTransport | None = None,
    retry_policy: RetryPolicy | None = None,
    refresh_after_seconds: float = DEFAULT_REFRESH_AFTER_SECONDS,
    max_response_mb: float = DEFAULT_MAX_RESPONSE_BYTES / 2**20,
    response_deadline_seconds: float = DEFAULT_RESPONSE_DEADLINE_SECONDS,
    budget_dir: str | None = None, local_budget_scope: str | None = None,
) -> AsyncIterator[SourceSession]:
    limits = httpx.Limits(max_connections=max_concurrency + 2,
                          max_keepalive_connections=max_concurrency + 2)
    async with httpx.AsyncClient(
        transport=transport, timeout=httpx.Timeout(timeout_seconds), limits=limits,
        follow_redirects=False, verify=shared_ssl_context(),
    ) as http:
        credentials = ClientCredentials(
            http, org_url=org_url, client_id=client_id, client_secret=client_secret,
            authority=authority, tenant_id=tenant_id, refresh_after_seconds=refresh_after_seconds,
            # Sessions over the network share tokens; an in-process simulator (a transport)
            # is a different org each time and costs nothing to ask.
            shared=SHARED_TOKENS if transport is None else None,
        )
        # One budget per application user: every session, thread, process and run with these
        # credentials shares its requests in flight and its Retry-After pauses. An in-process
        # simulator is an org of this process alone.
        key = budget_key(org_url, client_id)
        budget = (LocalBudget(f"{key}:{local_budget_scope}", max_concurrency)
                  if local_budget_scope is not None
                  else file_budget(budget_dir, key, max_concurrency))
        client = DataverseClient(http, credentials, org_url=org_url,
                                 max_concurrency=max_concurrency, retry_policy=retry_policy,
                                 max_response_bytes=int(max_response_mb * 2**20),
                                 response_deadline_seconds=response_deadline_seconds,
                                 budget=budget)
        try:
            yield ClientSession(client)
        finally:
            budget.close()


class HttpClientSource(DataverseSource):
    """A source read through the project's HTTP client (live Dataverse, the simulator): the
    client's limits, declared once."""

    max_concurrency: int = Field(
        8, ge=1, le=52, description="Requests in flight at once for this application user, "
        "across every session, run and process of this machine (DATAVERSE_MAX_CONCURRENCY).")
    budget_dir: str | None = Field(
        None, description="Where the application user's shared request budget lives "
        "(DATAVERSE_BUDGET_DIR); unset: the machine's temporary folder.")
    max_response_mb: float = Field(
        DEFAULT_MAX_RESPONSE_BYTES / 2**20, gt=0,
        description="A response body larger than this (MB) is refused with a clear error "
        "instead of being held in memory (DATAVERSE_MAX_RESPONSE_MB).",
    )
    response_deadline_seconds: float = Field(
        DEFAULT_RESPONSE_DEADLINE_SECONDS, gt=0,
        description="One response (headers and whole body) taking longer than this is a "
        "timeout, retried like one (DATAVERSE_RESPONSE_DEADLINE_SECONDS).",
    )


class LiveDataverseSource(HttpClientSource):
    """A real Dataverse org over HTTPS with OAuth client credentials."""

    url: str = Field(description="Org URL, e.g. https://contoso.crm.dynamics.com")
    client_id: str
    client_secret: str = Field(description="Set through EnvVar so the UI never shows it.")
    tenant_id: str | None = Field(None, description="Discovered from the org when not set.")
    authority: str = "https://login.microsoftonline.com"
    timeout_seconds: float = 120.0
    token_refresh_after_seconds: float = Field(
        DEFAULT_REFRESH_AFTER_SECONDS, gt=0,
        description="Refresh the access token this long after getting it (tokens live about "
        "an hour; never later than a minute before expiry).",
    )

    def open_session(self) -> AbstractAsyncContextManager[SourceSession]:
        return _client_session(
            org_url=self.url, client_id=self.client_id, client_secret=self.client_secret,
            authority=self.authority, tenant_id=self.tenant_id,
            max_concurrency=self.max_concurrency, timeout_seconds=self.timeout_seconds,
            refresh_after_seconds=self.token_refresh_after_seconds,
            max_response_mb=self.max_response_mb,
            response_deadline_seconds=self.response_deadline_seconds,
            budget_dir=self.budget_dir,
        )


