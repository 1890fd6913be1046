"""The simulator's HTTP face: a Starlette app speaking the Dataverse Web API and the token endpoint.

The app doubles as the Entra ID authority (`POST /<tenant>/oauth2/v2.0/token`), so a client
can discover the tenant from the 401 challenge and authenticate against the simulator without
any network access. All responses are built with orjson; request handling runs synchronously
under the simulator lock, which keeps mutations from tests and reads from clients consistent.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import engine
from .annotations import Annotator
from .choices import BASE_LANGUAGE, option_set_metadata, option_set_properties
from .gateway import ROWS_SERVED_SCOPE_KEY, Gateway, bearer_token
from .metadata import (
    ATTRIBUTE_CLASSES,
    ATTRIBUTE_PROPERTIES,
    ATTRIBUTE_PROPERTY_TYPES,
    ENTITY_PROPERTIES,
    ENTITY_PROPERTY_TYPES,
    ORGANIZATION_COLUMNS,
    UNRELATED_METADATA_CLASSES,
    attribute_definition,
    class_includes,
    class_properties,
    csdl,
    entity_definition,
    metadata_id,
    parse_attribute_expand,
    parse_navigation_expand,
    parse_property_select,
    project,
)
from .model import (
    BASE_CURRENCY,
    INVALID_ARGUMENT_CODE,
    MAX_PAGE_SIZE,
    DataverseSimulator,
    EntityTable,
    SimAttribute,
    SimEntity,
)
from .odata import (
    ODataQueryError,
    compile_filter,
    is_guid,
    parse_filter,
    parse_orderby,
    parse_select,
)
from .paging import decode_skiptoken, encode_skiptoken

logger = logging.getLogger(__name__)

API_PATH = "/api/data/v9.2"
JSON_TYPE = "application/json; odata.metadata=minimal"
NOT_FOUND_CODE = "0x80060888"
RECORD_NOT_FOUND_CODE = "0x80040217"
CHANGE_TRACKING_DISABLED_CODE = "0x80072491"
COUNT_CAP = 5000
PRIVILEGE_DENIED_CODE = "0x80040220"
RETRIEVE_TOTAL_RECORD_COUNT = "RetrieveTotalRecordCount"
ORGANIZATIONS = "organizations"
_CRM = "Microsoft.Dynamics.CRM."
# The organization row's etag: a version no record of the org is ever given.
_ORGANIZATION_VERSION = 1000

_KNOWN_OPTIONS = frozenset(
    {"$select", "$filter", "$orderby", "$top", "$skip", "$count", "$skiptoken", "$deltatoken",
     "$expand", "$apply", "$search", "$format"}
)
# Everything but these characters is percent-encoded when links repeat query options.
_LINK_SAFE = "$,()'*:/-_.~"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    merged = {"OData-Version": "4.0", "Content-Type": JSON_TYPE}
    if headers:
        merged.update(headers)
    return Response(orjson.dumps(body), status_code=status, headers=merged)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _encode_query(pairs: Sequence[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='$')}={quote(v, safe=_LINK_SAFE)}" for k, v in pairs)


@dataclass
class Preferences:
    """What the Prefer header(s) asked for."""

    max_page_size: int | None = None
    track_changes: bool = False
    annotations: str | None = None


def _split_prefer(header: str) -> list[str]:
    # Commas separate preferences except inside a quoted include-annotations list.
    items, current, quoted = [], [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_prefer(headers: Sequence[str]) -> Preferences:
    """Parse every Prefer header of a request."""
    prefs = Preferences()
    for header in headers:
        for item in _split_prefer(header):
            name, _, value = item.partition("=")
            name, value = name.strip().lower(), value.strip()
            if name == "odata.maxpagesize":
                try:
                    size = int(value)
                except ValueError:
                    continue
                if size > 0:
                    prefs.max_page_size = size
            elif name == "odata.track-changes":
                prefs.track_changes = True
            elif name == "odata.include-annotations":
                prefs.annotations = value.strip('"') or None
    return prefs


def _query_pairs(request: Request) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """All query parameters in order, and the `$` options (rejecting repeats, like Dataverse)."""
    raw = request.scope.get("query_string", b"").decode("utf-8", "replace")
    # parse_qsl turns '+' into a space, as ASP.NET does: clients must encode '+'.
    pairs = parse_qsl(raw, keep_blank_values=True)
    options: dict[str, str] = {}
    for key, value in pairs:
        if key.startswith("$"):
            if key in options:
                raise ODataQueryError(
                    f"Query option '{key}' was specified more than once, but it must be "
                    f"specified at most once."
                )
            options[key] = value
    return pairs, options


def _aad_error(status: int, error: str, code: int, description: str) -> Response:
    trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    timestamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {description} Trace ID: {trace_id} "
            f"Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    return Response(
        orjson.dumps(body),
        status_code=status,
        headers={"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"},
    )


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class _Api:
    """Request handlers bound to one simulator."""

    def __init__(self, sim: DataverseSimulator) -> None:
        self.sim = sim

    # -- plumbing --------------------------------------------------------------------------------

    def counted(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler so every response is counted and unexpected errors become JSON 500s."""

        async def wrapper(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception:
                logger.exception("simulator failed on %s", request.url.path)
                response = _error(500, "0x80040216", "An unexpected error occurred.")
            with self.sim.lock:
                self.sim.stats.status_counts[response.status_code] += 1
            return response

        return wrapper

    def _challenge(self, request: Request) -> dict[str, str]:
        base = _base_url(request)
        org = self.sim.org_url or base
        return {
            "WWW-Authenticate": (
                f"Bearer authorization_uri={base}/{self.sim.tenant_id}/oauth2/authorize, "
                f"resource_id={org}/"
            )
        }

    def _unauthorized(self, request: Request, state: str) -> Response | None:
        if state == "valid":
            return None
        message = {
            "missing": "Authorization header is missing or is not a Bearer token.",
            "expired": "The access token is expired.",
            "unknown": "The access token is invalid.",
        }[state]
        # Dataverse's 401 bodies carry no meaningful code; the challenge header is what counts.
        return _error(401, "", message, self._challenge(request))

    def _auth_state(self, request: Request) -> str:
        token = bearer_token(request.headers.get("authorization"))
        return self.sim.access_token_state(token) if token else "missing"

    # -- token endpoint --------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        """Client-credentials grant, answering like Entra ID (never echoing the secret)."""
        sim = self.sim
        with sim.lock:
            sim.stats.token_requests += 1
        tenant = request.path_params["tenant"]
        if tenant.lower() != sim.tenant_id:
            return _aad_error(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant "
                f"ID and are signing into the correct cloud.",
            )
        body = (await request.body()).decode("utf-8", "replace")
        form = dict(parse_qsl(body, keep_blank_values=True))
        for required in ("grant_type", "client_id", "scope"):
            if not form.get(required):
                return _aad_error(
                    400,
                    "invalid_request",
                    900144,
                    f"The request body must contain the following parameter: '{required}'.",
                )
        if form["grant_type"] != "client_credentials":
            return _aad_error(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            )
        if form["client_id"] != sim.client_id or form.get("client_secret") != sim.client_secret:
            return _aad_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is "
                "the client secret value, not the client secret ID, for a secret added to app "
                f"'{sim.client_id}'.",
            )
        scope = form["scope"]
        if not scope.endswith("/.default"):
            return _aad_error(
                400,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid. Client credential flows must have "
                "a scope value with /.default suffixed to the resource identifier.",
            )
        resource = scope[: -len("/.default")].rstrip("/")
        if sim.org_url and resource.lower() != sim.org_url.lower():
            return _aad_error(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{sim.tenant_id}.",
            )
        lifetime = sim.token_lifetime_seconds
        body_out = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": sim.issue_access_token(form["client_id"]),
        }
        return Response(
            orjson.dumps(body_out),
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "Cache-Control": "no-store, no-cache",
            },
        )

    async def openid_configuration(self, request: Request) -> Response:
        """Enough OpenID metadata for libraries that validate a custom authority."""
        base = _base_url(request)
        tenant = request.path_params["tenant"]
        body = {
            "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
            "issuer": f"{base}/{tenant}/v2.0",
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
            "response_types_supported": ["token"],
        }
        return Response(orjson.dumps(body), headers={"Content-Type": "application/json"})

    async def fallback(self, request: Request) -> Response:
        """Anything outside the Web API and the token endpoint."""
        return _error(404, NOT_FOUND_CODE, f"Resource not found for '{request.url.path}'.")

    # -- Web API ---------------------------------------------------------------------------------

    async def api(self, request: Request) -> Response:
        """Dispatch /api/data/v9.2/...: auth, then the resource the first segment names."""
        sim = self.sim
        rest = request.path_params.get("rest", "")
        segments = [s for s in rest.split("/") if s != ""] if rest else []
        head = segments[0] if segments else ""
        name, _, key_part = head.partition("(")
        key = key_part[:-1] if key_part.endswith(")") else None
        if key_part and key is None:
            key = key_part  # malformed; reported below
        is_entity_set = name not in ("", "$metadata", "EntityDefinitions", "WhoAmI", "$batch",
                                     RETRIEVE_TOTAL_RECORD_COUNT)
        with sim.lock:
            if is_entity_set:
                sim.stats.requests += 1
                if sim.find_table(name) is not None:
                    sim.stats.requests_by_entity[name] += 1
            elif name in ("$metadata", "EntityDefinitions"):
                sim.stats.metadata_requests += 1
        denied = self._unauthorized(request, self._auth_state(request))
        if denied is not None:
            return denied
        if request.method != "GET":
            return _error(
                405,
                "0x80060888",
                f"The simulator serves reads only; {request.method} is not supported.",
            )
        base = _base_url(request)
        try:
            pairs, options = _query_pairs(request)
            with sim.lock:
                if name == "":
                    return self._service_document(base)
                if name == "$metadata":
                    xml = csdl([table.spec for table in sim.tables()])
                    return Response(
                        xml.encode("utf-8"),
                        headers={"Content-Type": "application/xml", "OData-Version": "4.0"},
                    )
                if name == "EntityDefinitions":
                    return self._entity_definitions(base, key, segments[1:], options)
                if name == "WhoAmI":
                    return self._who_am_i(base)
                if name == "$batch":
                    return _error(400, INVALID_ARGUMENT_CODE, "The simulator does not do $batch.")
                if name == RETRIEVE_TOTAL_RECORD_COUNT:
                    return self._total_record_count(base, key, pairs)
                table = sim.find_table(name)
                if table is None and name == ORGANIZATIONS and len(segments) == 1:
                    return self._organizations(base, key, options)
                client = self._client(request)
                if table is not None and not sim.may_read(name, client):
                    logical = table.spec.logical_name
                    return _error(
                        403, PRIVILEGE_DENIED_CODE,
                        f"Principal user (Id={client}, type=8) is missing "
                        f"prvRead{logical} privilege on entity '{logical}'.",
                    )
                if table is None or len(segments) > 1:
                    missing = name if table is None else segments[1]
                    return _error(
                        404, NOT_FOUND_CODE, f"Resource not found for the segment '{missing}'."
                    )
                if key is not None:
                    return self._record(request, base, table, key, options)
                return self._collection(request, base, table, pairs, options)
        except ODataQueryError as exc:
            return _error(exc.status, exc.code, exc.message)

    def _client(self, request: Request) -> str | None:
        token = bearer_token(request.headers.get("authorization"))
        return self.sim.token_client(token) if token else None

    def _total_record_count(
        self, base: str, key: str | None, pairs: list[tuple[str, str]]
    ) -> Response:
        """The RetrieveTotalRecordCount function: whole-table sizes past $count's limit."""
        aliases = dict(pairs)
        argument = (key or "").partition("=")
        if argument[0] != "EntityNames" or not argument[2]:
            return _error(400, INVALID_ARGUMENT_CODE,
                          "RetrieveTotalRecordCount expects (EntityNames=@alias).")
        raw = aliases.get(argument[2], argument[2]).strip()
        if not (raw.startswith("[") and raw.endswith("]")):
            return _error(400, INVALID_ARGUMENT_CODE,
                          f"EntityNames must be a list of logical names, not {raw!r}.")
        names = [item.strip() for item in raw[1:-1].split(",") if item.strip()]
        names = [n[1:-1].replace("''", "'") if n[:1] == n[-1:] == "'" and len(n) > 1 else n
                 for n in names]
        values = []
        for logical in names:
            table = self.sim.table_by_logical(logical)
            if table is None:
                return _error(404, NOT_FOUND_CODE,
                              f"Could not find an entity with logical name '{logical}'.")
            values.append(len(table.rows))
        return _json({
            "@odata.context": f"{base}{API_PATH}/$metadata#Microsoft.Dynamics.CRM."
                              "RetrieveTotalRecordCountResponse",
            "EntityRecordCountCollection": {"Count": len(names), "IsReadOnly": False,
                                            "Keys": names, "Values": values},
        })

    def _service_document(self, base: str) -> Response:
        names = [t.spec.entity_set_name for t in self.sim.tables()]
        if ORGANIZATIONS not in names:
            names.append(ORGANIZATIONS)
        value = [{"name": name, "kind": "EntitySet", "url": name} for name in names]
        return _json({"@odata.context": f"{base}{API_PATH}/$metadata", "value": value})

    def _organizations(self, base: str, key: str | None, options: dict[str, str]) -> Response:
        """The organization table: one row, the org itself. `languagecode` is the base
        language, which is how a client learns which labels are the org's own."""
        sim = self.sim
        for option in options:
            if option not in ("$select", "$top"):
                raise ODataQueryError(f"The query parameter {option} is not supported")
        row = {
            "@odata.etag": f'W/"{_ORGANIZATION_VERSION}"',
            "organizationid": sim.organization_id,
            "name": "Simulated Dataverse Org",
            "languagecode": BASE_LANGUAGE,
            "_basecurrencyid_value": BASE_CURRENCY.id,
        }
        selected = None
        if "$select" in options:
            selected = parse_select(options["$select"], ORGANIZATION_COLUMNS, "organization")
            keys = ["@odata.etag", *selected]
            if "organizationid" not in keys:
                keys.append("organizationid")
            row = {k: row[k] for k in keys}
        select_part = f"({','.join(selected)})" if selected else ""
        context = f"{base}{API_PATH}/$metadata#{ORGANIZATIONS}{select_part}"
        if key is not None:
            if key.strip().lower() != sim.organization_id:
                return _error(404, RECORD_NOT_FOUND_CODE,
                              f"organization With Id = {key} Does Not Exist")
            return _json({"@odata.context": f"{context}/$entity", **row})
        rows = [row][: int(options["$top"])] if options.get("$top", "").isdigit() else [row]
        return _json({"@odata.context": context, "value": rows})

    def _who_am_i(self, base: str) -> Response:
        sim = self.sim
        users = sim.find_table("systemusers")
        units = sim.find_table("businessunits")
        user_id = users.key_to_pk[users.order_keys[0]] if users and users.order_keys else None
        unit_id = units.key_to_pk[units.order_keys[0]] if units and units.order_keys else None
        return _json(
            {
                "@odata.context": (
                    f"{base}{API_PATH}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"
                ),
                "BusinessUnitId": unit_id or sim.organization_id,
                "UserId": user_id or sim.organization_id,
                "OrganizationId": sim.organization_id,
            }
        )

    # -- rows ------------------------------------------------------------------------------------

    def _projection(
        self, table: EntityTable, options: dict[str, str]
    ) -> tuple[list[str] | None, list[str] | None]:
        """(selected columns as requested, row keys to emit) for $select; (None, None) = all."""
        if "$select" not in options:
            return None, None
        spec = table.spec
        selected = parse_select(options["$select"], table.column_types, spec.logical_name)
        keys = ["@odata.etag", *selected]
        if spec.primary_id_attribute not in keys:
            keys.append(spec.primary_id_attribute)
        return selected, keys

    def _shape(
        self,
        table: EntityTable,
        rows: list[dict[str, Any]],
        keys: list[str] | None,
        annotator: Annotator | None,
    ) -> list[dict[str, Any]]:
        if annotator is not None:
            all_keys = keys or ["@odata.etag", *table.spec.columns]
            return [annotator(row, all_keys) for row in rows]
        if keys is None:
            return rows  # stored rows already have the wire shape
        return [{k: row[k] for k in keys} for row in rows]

    def _annotator(self, table: EntityTable, prefs: Preferences) -> Annotator | None:
        if not prefs.annotations:
            return None
        patterns = [p.strip() for p in prefs.annotations.split(",") if p.strip()]
        return Annotator(self.sim, table, patterns)

    def _record(
        self,
        request: Request,
        base: str,
        table: EntityTable,
        key: str,
        options: dict[str, str],
    ) -> Response:
        spec = table.spec
        for option in options:
            if option not in ("$select", "$expand"):
                raise ODataQueryError(f"The query parameter {option} is not supported")
        if "$expand" in options:
            raise ODataQueryError("The simulator does not implement $expand.")
        guid = key.strip()
        if guid.startswith(f"{spec.primary_id_attribute}="):
            guid = guid.split("=", 1)[1]
        if not is_guid(guid):
            raise ODataQueryError(f"Bad Request - Error in query syntax: '{key}' is not a key.")
        guid = guid.lower()
        selected, keys = self._projection(table, options)
        row = table.rows.get(guid)
        if row is None:
            return _error(
                404, RECORD_NOT_FOUND_CODE, f"{spec.logical_name} With Id = {guid} Does Not Exist"
            )
        prefs = parse_prefer(request.headers.getlist("prefer"))
        annotator = self._annotator(table, prefs)
        shaped = self._shape(table, [row], keys, annotator)[0]
        select_part = f"({','.join(selected)})" if selected else ""
        body = {
            "@odata.context": (
                f"{base}{API_PATH}/$metadata#{spec.entity_set_name}{select_part}/$entity"
            ),
            **shaped,
        }
        self.sim.stats.rows_served[spec.entity_set_name] += 1
        request.scope[ROWS_SERVED_SCOPE_KEY] = 1
        headers = {}
        if annotator is not None:
            headers["Preference-Applied"] = f'odata.include-annotations="{prefs.annotations}"'
        return _json(body, headers=headers)

    def _collection(
        self,
        request: Request,
        base: str,
        table: EntityTable,
        pairs: list[tuple[str, str]],
        options: dict[str, str],
    ) -> Response:
        sim, spec = self.sim, table.spec
        for option in options:
            if option not in _KNOWN_OPTIONS:
                raise ODataQueryError(f"The query parameter {option} is not supported")
        if "$skip" in options:
            raise ODataQueryError("The query parameter $skip is not supported")
        prefs = parse_prefer(request.headers.getlist("prefer"))
        delta_token = options.get("$deltatoken")
        tracking = prefs.track_changes or delta_token is not None
        if tracking:
            if not spec.change_tracking_enabled:
                raise ODataQueryError(
                    f"Entity '{spec.logical_name}' is not enabled for change tracking.",
                    code=CHANGE_TRACKING_DISABLED_CODE,
                )
            for option in ("$filter", "$orderby", "$top", "$expand", "$apply", "$search"):
                if option in options:
                    raise ODataQueryError(
                        f"The query option {option} is not supported with change tracking.",
                        code=INVALID_ARGUMENT_CODE,
                    )
        for option in ("$expand", "$apply", "$search"):
            if option in options:
                raise ODataQueryError(f"The simulator does not implement {option}.")
        selected, keys = self._projection(table, options)
        annotator = self._annotator(table, prefs)
        page_size = min(prefs.max_page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
        select_part = f"({','.join(selected)})" if selected else ""
        applied: list[str] = []
        if delta_token is not None:
            if prefs.max_page_size:
                applied.append(f"odata.maxpagesize={page_size}")
            if prefs.track_changes:
                applied.append("odata.track-changes")
            return self._delta(
                request, base, table, pairs, options, delta_token, page_size, keys, annotator,
                select_part, prefs, applied,
            )

        query = engine.CollectionQuery(table=table)
        if "$filter" in options:
            query.filter_text = options["$filter"]
            query.filter_expr = parse_filter(
                options["$filter"], table.column_types, spec.logical_name
            )
            query.predicate = compile_filter(query.filter_expr)
        if "$orderby" in options:
            query.order = parse_orderby(
                options["$orderby"], table.column_types, spec.logical_name
            )
        top: int | None = None
        if "$top" in options:
            try:
                top = int(options["$top"])
            except ValueError:
                top = -1
            if top < 0:
                raise ODataQueryError(
                    f"Invalid value '{options['$top']}' for $top query option found. The $top "
                    f"query option requires a non-negative integer value."
                )
        count_requested = options.get("$count", "false").lower() == "true"
        cursor = None
        if "$skiptoken" in options:
            cursor = decode_skiptoken(
                options["$skiptoken"], query.order_columns, query.primary_key, table.column_types
            )
        # $top wins over odata.maxpagesize and ends paging.
        limit = min(top, MAX_PAGE_SIZE) if top is not None else page_size
        if sim.paging == "page_number" and cursor is not None:
            rows, has_more = engine.fetch_page_by_number(query, cursor.page_number, limit)
        else:
            rows, has_more = engine.fetch_page(query, cursor, limit)
        if top is not None:
            has_more = False
        # A change-tracking full sync pins the version it started at, so changes made while
        # the client pages are still reported by the next delta.
        snapshot = None
        if prefs.track_changes:
            snapshot = cursor.version if cursor and cursor.version is not None else sim.version
        body: dict[str, Any] = {
            "@odata.context": f"{base}{API_PATH}/$metadata#{spec.entity_set_name}{select_part}"
        }
        if count_requested:
            # Dataverse counts to 5000 and says so when there are more.
            count = engine.count_matching(query, COUNT_CAP + 1)
            body["@odata.count"] = min(count, COUNT_CAP)
            if count > COUNT_CAP:
                body["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] = True
        body["value"] = self._shape(table, rows, keys, annotator)
        if has_more and rows:
            token = encode_skiptoken(
                (cursor.page_number + 1) if cursor else 2,
                query.order_columns,
                query.primary_key,
                table.column_types,
                rows[-1],
                rows[0],
                version=snapshot,
                tracking=prefs.track_changes,
            )
            body["@odata.nextLink"] = self._link(base, spec.entity_set_name, pairs, token)
        elif prefs.track_changes and not self._withholds_delta_link(annotator):
            assert snapshot is not None
            body["@odata.deltaLink"] = self._delta_link(base, spec.entity_set_name, options,
                                                        self._token_version(snapshot))
        if prefs.max_page_size and top is None:
            applied.append(f"odata.maxpagesize={page_size}")
        if prefs.track_changes:
            applied.append("odata.track-changes")
        if annotator is not None:
            applied.append(f'odata.include-annotations="{prefs.annotations}"')
        sim.stats.rows_served[spec.entity_set_name] += len(body["value"])
        request.scope[ROWS_SERVED_SCOPE_KEY] = len(body["value"])
        headers = {"Preference-Applied": ",".join(applied)} if applied else None
        return _json(body, headers=headers)

    def _withholds_delta_link(self, annotator: Annotator | None) -> bool:
        """The reported quirk, made to happen: a change-tracking read that asked for
        annotations gets no @odata.deltaLink on its last page."""
        return annotator is not None and self.sim.omit_delta_link_with_annotations

    def _token_version(self, pinned: int) -> int:
        """The version a read's delta token marks: the read's first moment (pinned on its
        first page), or with `delta_token_moment="last_page"` the moment of its last page."""
        return self.sim.version if self.sim.delta_token_moment == "last_page" else pinned

    def _link(
        self, base: str, entity_set: str, pairs: list[tuple[str, str]], skiptoken: str
    ) -> str:
        kept = [(k, v) for k, v in pairs if k != "$skiptoken"]
        kept.append(("$skiptoken", skiptoken))
        return f"{base}{API_PATH}/{entity_set}?{_encode_query(kept)}"

    def _delta_link(
        self, base: str, entity_set: str, options: dict[str, str], version: int
    ) -> str:
        query = _encode_query([("$select", options["$select"])]) if "$select" in options else ""
        # Dataverse encodes the token fully, with lower-case hex: 919042%2108%2f22%2f2017%20...
        token = re.sub(
            r"%[0-9A-F]{2}",
            lambda m: m.group(0).lower(),
            quote(self.sim.issue_delta_token(version), safe=""),
        )
        query = f"{query}&$deltatoken={token}" if query else f"$deltatoken={token}"
        return f"{base}{API_PATH}/{entity_set}?{query}"

    def _delta(
        self,
        request: Request,
        base: str,
        table: EntityTable,
        pairs: list[tuple[str, str]],
        options: dict[str, str],
        delta_token: str,
        page_size: int,
        keys: list[str] | None,
        annotator: Annotator | None,
        select_part: str,
        prefs: Preferences,
        applied: list[str],
    ) -> Response:
        sim, spec = self.sim, table.spec
        from_version = sim.check_delta_token(delta_token)
        cursor = None
        if "$skiptoken" in options:
            cursor = decode_skiptoken(
                options["$skiptoken"], [], spec.primary_id_attribute, table.column_types
            )
        # Pin the window's upper end on the first page so later pages see the same list.
        to_version = cursor.version if cursor and cursor.version is not None else sim.version
        position = cursor.position if cursor and cursor.position is not None else 0
        items = engine.delta_items(table, from_version, to_version)
        window = items[position : position + page_size]
        has_more = position + page_size < len(items)
        changed: list[dict[str, Any]] = []
        value: list[dict[str, Any]] = []
        deleted_context = f"{base}{API_PATH}/$metadata#{spec.entity_set_name}/$deletedEntity"
        for pk, kind in window:
            if kind == "upsert":
                row = table.rows.get(pk)
                # Deleted again after the window closed: the next delta reports the delete.
                if row is not None:
                    changed.append(row)
            else:
                value.extend(self._shape(table, changed, keys, annotator))
                changed = []
                value.append({"@odata.context": deleted_context, "id": pk, "reason": "deleted"})
        value.extend(self._shape(table, changed, keys, annotator))
        body: dict[str, Any] = {
            "@odata.context": (
                f"{base}{API_PATH}/$metadata#{spec.entity_set_name}{select_part}/$delta"
            ),
            "value": value,
        }
        if has_more:
            token = encode_skiptoken(
                (cursor.page_number + 1) if cursor else 2,
                [],
                spec.primary_id_attribute,
                table.column_types,
                None,
                None,
                version=to_version,
                position=position + page_size,
                tracking=True,
            )
            body["@odata.nextLink"] = self._link(base, spec.entity_set_name, pairs, token)
        elif not self._withholds_delta_link(annotator):
            body["@odata.deltaLink"] = self._delta_link(
                base, spec.entity_set_name, options, self._token_version(to_version)
            )
        if annotator is not None:
            applied.append(f'odata.include-annotations="{prefs.annotations}"')
        sim.stats.rows_served[spec.entity_set_name] += len(value)
        request.scope[ROWS_SERVED_SCOPE_KEY] = len(value)
        headers = {"Preference-Applied": ",".join(applied)} if applied else None
        return _json(body, headers=headers)

    # -- metadata --------------------------------------------------------------------------------

    def _entity_definitions(
        self, base: str, key: str | None, tail: list[str], options: dict[str, str]
    ) -> Response:
        sim = self.sim
        context_root = f"{base}{API_PATH}/$metadata#EntityDefinitions"
        for option in options:
            if option not in ("$select", "$filter", "$expand"):
                raise ODataQueryError(f"The query parameter {option} is not supported")
        if key is None:
            if tail:
                return _error(
                    404, NOT_FOUND_CODE, f"Resource not found for the segment '{tail[0]}'."
                )
            select = self._entity_select(options)
            expand = self._attribute_expand(options)
            predicate = None
            if "$filter" in options:
                predicate = compile_filter(
                    parse_filter(options["$filter"], ENTITY_PROPERTY_TYPES, "EntityMetadata")
                )
            value = []
            for table in sim.tables():
                item = entity_definition(table.spec)
                if predicate is not None and not predicate(item):
                    continue
                value.append(self._entity_item(table, item, select, expand))
            context = context_root + self._select_suffix(select, expand)
            return _json({"@odata.context": context, "value": value})
        table = self._definition_table(key)
        if table is None:
            return _error(
                404,
                RECORD_NOT_FOUND_CODE,
                f"Could not find an entity with key {key}.",
            )
        if not tail:
            select = self._entity_select(options)
            expand = self._attribute_expand(options)
            item = self._entity_item(table, entity_definition(table.spec), select, expand)
            context = f"{context_root}{self._select_suffix(select, expand)}/$entity"
            return _json({"@odata.context": context, **item})
        segment, _, attribute_key = tail[0].partition("(")
        if segment != "Attributes" or len(tail) > 2:
            return _error(404, NOT_FOUND_CODE, f"Resource not found for the segment '{tail[-1]}'.")
        if attribute_key or len(tail) == 2:
            return self._typed_attributes(
                base, table, key, attribute_key[:-1] if attribute_key else None,
                tail[1] if len(tail) == 2 else None, options,
            )
        if "$expand" in options:
            raise ODataQueryError("The simulator does not implement $expand on Attributes.")
        select = None
        if "$select" in options:
            select = parse_property_select(
                options["$select"], ATTRIBUTE_PROPERTIES, "AttributeMetadata"
            )
        predicate = None
        if "$filter" in options:
            predicate = compile_filter(
                parse_filter(options["$filter"], ATTRIBUTE_PROPERTY_TYPES, "AttributeMetadata")
            )
        attributes = []
        for attribute in table.spec.attributes:
            item = attribute_definition(table.spec, attribute)
            if predicate is not None and not predicate(item):
                continue
            attributes.append(project(item, select))
        context = (
            f"{context_root}({table.spec.logical_name})/Attributes"
            + (f"({','.join(select)})" if select else "")
        )
        return _json({"@odata.context": context, "value": attributes})

    def _typed_attributes(
        self,
        base: str,
        table: EntityTable,
        entity_key: str,
        attribute_key: str | None,
        cast: str | None,
        options: dict[str, str],
    ) -> Response:
        """`Attributes/Microsoft.Dynamics.CRM.<Class>` (the attributes of that class, with
        their class's own properties and navigation properties: OptionSet, GlobalOptionSet),
        and `Attributes(<key>)`, with or without a cast."""
        spec = table.spec
        allowed = ("$select", "$expand") if attribute_key is not None else (
            "$select", "$filter", "$expand")
        for option in options:
            if option not in allowed:
                raise ODataQueryError(f"The query parameter {option} is not supported")
        cast_class = self._cast_class(cast) if cast is not None else "AttributeMetadata"
        selectable, filterable, navigation = class_properties(cast_class)
        select = None
        if "$select" in options:
            select = parse_property_select(options["$select"], [*selectable, *navigation],
                                           cast_class)
        expand: dict[str, list[str] | None] = {}
        if "$expand" in options:
            expand = parse_navigation_expand(
                options["$expand"], navigation, cast_class,
                lambda name: self._navigation_type(cast_class, name),
            )
        if attribute_key is not None:
            attribute = self._definition_attribute(spec, attribute_key)
            if attribute is None:
                return _error(404, RECORD_NOT_FOUND_CODE,
                              f"Could not find an attribute with key {attribute_key}.")
            if not class_includes(cast_class, attribute):
                return _error(404, NOT_FOUND_CODE, f"Resource not found for the segment '{cast}'.")
            attributes = [attribute]
        else:
            predicate = None
            if "$filter" in options:
                predicate = compile_filter(parse_filter(options["$filter"], filterable,
                                                        cast_class))
            attributes = [
                a for a in spec.attributes
                if class_includes(cast_class, a)
                and (predicate is None or predicate(attribute_definition(spec, a)))
            ]
        fields = [name for name in select or () if name not in navigation]
        items = []
        for attribute in attributes:
            item = project(attribute_definition(spec, attribute), fields if select else None)
            if item.get("@odata.type") == f"#{_CRM}{cast_class}":
                del item["@odata.type"]  # the declared type needs no annotation
            for name, nested in expand.items():
                value = self._navigation_value(spec, attribute, name)
                item[name] = None if value is None else project(value, nested)
            items.append(item)
        entity_part = (f"EntityDefinitions('{spec.logical_name}')"
                       if entity_key.strip().startswith("LogicalName=")
                       else f"EntityDefinitions({entity_key.strip()})")
        path = f"{entity_part}/Attributes" + (f"/{_CRM}{cast_class}" if cast else "")
        parts = [*(select or ()), *(n for n in expand if n not in (select or ()))]
        parts += [f"{n}({','.join(nested)})" for n, nested in expand.items() if nested]
        context = f"{base}{API_PATH}/$metadata#{path}" + (f"({','.join(parts)})" if parts else "")
        if attribute_key is not None:
            return _json({"@odata.context": f"{context}/$entity", **items[0]})
        return _json({"@odata.context": context, "value": items})

    def _cast_class(self, segment: str) -> str:
        """The AttributeMetadata class a type-cast segment names. An unknown name is no
        segment OData can resolve (404); a known type that is not an attribute class cannot
        follow Attributes (400)."""
        name = segment[len(_CRM):] if segment.startswith(_CRM) else None
        if name in ATTRIBUTE_CLASSES:
            return name
        if name is not None and (name in UNRELATED_METADATA_CLASSES
                                 or self.sim.table_by_logical(name) is not None):
            raise ODataQueryError(
                f"The type '{segment}' specified in the URI is neither a base type nor a "
                f"sub-type of the previously-specified type "
                f"'{_CRM}AttributeMetadata'."
            )
        raise ODataQueryError(f"Resource not found for the segment '{segment}'.",
                              code=NOT_FOUND_CODE, status=404)

    @staticmethod
    def _navigation_type(cast_class: str, name: str) -> tuple[str, tuple[str, ...]]:
        boolean = cast_class == "BooleanAttributeMetadata" and name == "OptionSet"
        return ("BooleanOptionSetMetadata" if boolean else "OptionSetMetadata",
                option_set_properties(boolean))

    def _navigation_value(self, spec: SimEntity, attribute: SimAttribute,
                          name: str) -> dict[str, Any] | None:
        """OptionSet / GlobalOptionSet of a choice attribute: a local set is OptionSet only;
        a global set is both (or, as Microsoft's docs describe it, GlobalOptionSet only)."""
        sim = self.sim
        option_set = sim.option_set_of(spec, attribute)
        if name == "GlobalOptionSet" and not option_set.is_global:
            return None
        if name == "OptionSet" and option_set.is_global and sim.option_set_null_when_global:
            return None
        return option_set_metadata(option_set, sim.user_language_code)

    @staticmethod
    def _definition_attribute(spec: SimEntity, key: str) -> SimAttribute | None:
        key = key.strip()
        if key.startswith("LogicalName="):
            logical = key.split("=", 1)[1].strip().strip("'")
            return next((a for a in spec.attributes if a.logical_name == logical), None)
        if is_guid(key):
            return next((a for a in spec.attributes
                         if metadata_id(spec.logical_name, a.logical_name) == key.lower()), None)
        raise ODataQueryError(f"Bad Request - Error in query syntax: '{key}' is not a key.")

    def _definition_table(self, key: str) -> EntityTable | None:
        key = key.strip()
        if key.startswith("LogicalName="):
            logical = key.split("=", 1)[1].strip().strip("'")
            return self.sim.table_by_logical(logical)
        if is_guid(key):
            for table in self.sim.tables():
                if entity_definition(table.spec)["MetadataId"] == key.lower():
                    return table
            return None
        raise ODataQueryError(f"Bad Request - Error in query syntax: '{key}' is not a key.")

    @staticmethod
    def _entity_select(options: dict[str, str]) -> list[str] | None:
        if "$select" not in options:
            return None
        return parse_property_select(options["$select"], ENTITY_PROPERTIES, "EntityMetadata")

    @staticmethod
    def _attribute_expand(options: dict[str, str]) -> tuple[bool, list[str] | None]:
        if "$expand" not in options:
            return False, None
        return True, parse_attribute_expand(options["$expand"])

    @staticmethod
    def _select_suffix(select: list[str] | None, expand: tuple[bool, list[str] | None]) -> str:
        parts = list(select or [])
        expanded, attribute_select = expand
        if expanded:
            parts.append(f"Attributes({','.join(attribute_select or [])})")
        return f"({','.join(parts)})" if parts else ""

    @staticmethod
    def _entity_item(
        table: EntityTable,
        item: dict[str, Any],
        select: list[str] | None,
        expand: tuple[bool, list[str] | None],
    ) -> dict[str, Any]:
        out = project(item, select)
        expanded, attribute_select = expand
        if expanded:
            out["Attributes"] = [
                project(attribute_definition(table.spec, attribute), attribute_select)
                for attribute in table.spec.attributes
            ]
        return out


_OPTION_ACTIONS = ("set_option_label", "add_option", "remove_option")
_SETTINGS = ("user_language_code", "omit_delta_link_with_annotations",
             "option_set_null_when_global")


def _mutation(sim: DataverseSimulator, body: dict[str, Any]) -> dict[str, Any]:
    """What one `/_simulator/mutate` body asks for, done; the answer's body."""
    if "update" in body:
        touched = sim.mutate_for_fault(body["entity"], "modify_records", int(body["update"]))
        return {"updated": len(touched)}
    action = body.get("action")
    if action == "settings":
        unknown = set(body) - {"action", *_SETTINGS}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; one of {_SETTINGS}")
        with sim.lock:
            for name in _SETTINGS:
                if name in body:
                    setattr(sim, name, body[name])
            return {name: getattr(sim, name) for name in _SETTINGS}
    if action not in _OPTION_ACTIONS:
        raise ValueError(f"action is one of {', '.join((*_OPTION_ACTIONS, 'settings'))}, "
                         f"or give {{\"entity\", \"update\": N}}")
    entity, attribute, value = body["entity"], body["attribute"], int(body["value"])
    if action == "set_option_label":
        sim.set_option_label(entity, attribute, value, body["label"],
                             int(body.get("language_code", BASE_LANGUAGE)))
    elif action == "add_option":
        sim.add_option(entity, attribute, value, body["label"],
                       language_code=int(body.get("language_code", BASE_LANGUAGE)),
                       state=body.get("state"), default_status=body.get("default_status"))
    else:
        sim.remove_option(entity, attribute, value)
    option_set = sim.option_set(entity, attribute)
    return {"option_set": option_set.name, "options": [
        {"value": o.value, "labels": {str(k): v for k, v in o.labels.items()}}
        for o in option_set.options]}


def _control_routes(sim: DataverseSimulator) -> list[Route]:
    """How a benchmark or a test drives and observes a simulator running in another process.
    Off unless asked for.

    - `/_simulator/stats`: GET the counters; POST zeroes them.
    - `/_simulator/mutate` (POST, JSON): `{"entity", "update": N}` edits N random rows, as
      another user would; `{"action": "set_option_label" | "add_option" | "remove_option",
      "entity", "attribute", "value", "label", "language_code", "state", "default_status"}`
      changes an option set like the methods of the same names (rows untouched); `{"action":
      "settings", "user_language_code" | "omit_delta_link_with_annotations" |
      "option_set_null_when_global": ...}` sets those simulator settings. A bad request
      answers 400 with the reason.
    """

    async def stats(request: Request) -> Response:
        with sim.lock:
            if request.method == "POST":
                sim.reset_stats()
            s = sim.stats
            return _json({
                "requests": s.requests, "requests_by_entity": dict(s.requests_by_entity),
                "rows_served": dict(s.rows_served), "token_requests": s.token_requests,
                "metadata_requests": s.metadata_requests,
                "status_counts": {str(k): v for k, v in s.status_counts.items()},
                "throttled": s.throttled, "throttled_by_code": dict(s.throttled_by_code),
                "max_concurrency": s.max_concurrency,
            })

    async def mutate(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body is a JSON object")
            return _json(_mutation(sim, body))
        except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as exc:
            return _error(400, INVALID_ARGUMENT_CODE, f"{type(exc).__name__}: {exc}")

    return [Route("/_simulator/stats", stats, methods=["GET", "POST"]),
            Route("/_simulator/mutate", mutate, methods=["POST"])]


def create_app(sim: DataverseSimulator, *, control: bool = False) -> Starlette:
    """The ASGI app serving one simulator (Web API under /api/data/v9.2, token endpoint);
    `control` adds the benchmark's control endpoints (see _control_routes)."""
    api = _Api(sim)
    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    routes = _control_routes(sim) if control else []
    routes += [
        Route("/{tenant}/oauth2/v2.0/token", api.counted(api.token), methods=["POST"]),
        Route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            api.counted(api.openid_configuration),
            methods=["GET"],
        ),
        Route(API_PATH, api.counted(api.api), methods=methods),
        Route(API_PATH + "/{rest:path}", api.counted(api.api), methods=methods),
        Route("/{path:path}", api.counted(api.fallback), methods=methods),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Gateway, sim=sim, api_path=API_PATH)])
    app.state.simulator = sim
    return app
