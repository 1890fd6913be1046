"""The simulated Dataverse org: table specs, seeded deterministic rows and a mutation API.

Rows are stored exactly as the Web API returns them (`@odata.etag` first, lookups as
`_<name>_value`), so serving a page without `$select` needs no per-row work. Row dicts are
never mutated in place: updates swap in a new dict, so a page being serialised is never torn.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import secrets
import threading
import time
import unicodedata
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from .choices import (
    BASE_LANGUAGE,
    OPTION_SET_TYPE,
    SimOption,
    SimOptionSet,
    formatted_choice,
    local_set_name,
    multi_select_value,
    new_option_set,
)
from .faults import Fault, FaultBoard, FaultPlan
from .identity import SIMULATOR_CLIENT_ID, SIMULATOR_CLIENT_SECRET, SIMULATOR_TENANT_ID
from .latency import LatencyModel
from .lazy import DerivedKeyMap, LazyKeyIndex, LazyRows, LazyRowSource
from .odata import (
    CATEGORY_BY_TYPE,
    ODataQueryError,
    format_datetime,
    guid_order_key,
    is_guid,
    parse_datetime,
)
from .protection import ServiceProtection, ServiceProtectionLimits

MAX_PAGE_SIZE = 5000
EXPIRED_VERSION_CODE = "0x80044352"
EXPIRED_VERSION_MESSAGE = (
    "Version stamp associated with the client has expired. Please perform a full sync."
)
INVALID_ARGUMENT_CODE = "0x80040203"

LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})
_VIRTUAL_NAME_FOR = frozenset({"Picklist", "MultiSelectPicklist", "State", "Status", "Boolean"})
# The simulator's kinds that metadata lists as AttributeType "Virtual", and their
# AttributeTypeName. Multi-select and file columns are in rows all the same; images are not.
_VIRTUAL_KINDS = {
    "Virtual": "VirtualType",
    "MultiSelectPicklist": "MultiSelectPicklistType",
    "File": "FileType",
    "Image": "ImageType",
}
_NOT_IN_ROWS = frozenset({"Virtual", "Image"})
DATE_BEHAVIORS = ("UserLocal", "DateOnly", "TimeZoneIndependent")

_SEED_START = datetime(2024, 1, 1, tzinfo=UTC)
_SEED_END = datetime(2026, 1, 1, tzinfo=UTC)

# Tables larger than this are generated lazily (rows built on demand from their index).
LAZY_ROW_THRESHOLD = 100_000
# A lazy table copies column values from this many rows made by the ordinary generator.
LAZY_TEMPLATE_ROWS = 4096


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimAttribute:
    """One column as EntityDefinitions/Attributes describes it.

    `attribute_type` is the AttributeType, or one of the kinds metadata lists as "Virtual":
    "MultiSelectPicklist", "File" (both in rows) and "Image" (not in rows), like "Virtual".
    """

    logical_name: str
    attribute_type: str
    targets: tuple[str, ...] = ()
    nullable: bool = False
    attribute_of: str | None = None
    # Choices: the global option set the column uses; None is a local set of its own.
    option_set: str | None = None
    # DateTime: "UserLocal" (None), "DateOnly" (rows carry "YYYY-MM-DD") or "TimeZoneIndependent".
    date_behavior: str | None = None
    # Money: this is the `<money>_base` column, the value in the org's base currency.
    is_base_currency: bool = False
    # Added after the first release of the simulated org: values come from a stream of their
    # own per row, so every earlier column keeps its values for a seed.
    late: bool = False

    def __post_init__(self) -> None:
        if self.date_behavior is not None and self.date_behavior not in DATE_BEHAVIORS:
            raise ValueError(f"date_behavior is one of {', '.join(DATE_BEHAVIORS)}")

    @property
    def is_lookup(self) -> bool:
        """Lookup, Customer and Owner columns travel as `_<name>_value` GUIDs."""
        return self.attribute_type in LOOKUP_TYPES

    @property
    def is_virtual(self) -> bool:
        """Virtual (and image) columns exist in metadata but never in rows."""
        return self.attribute_type in _NOT_IN_ROWS

    @property
    def is_choice(self) -> bool:
        """Picklist, MultiSelectPicklist, State, Status and Boolean columns have option sets."""
        return self.attribute_type in OPTION_SET_TYPE

    @property
    def metadata_type(self) -> str:
        """The AttributeType metadata reports."""
        return "Virtual" if self.attribute_type in _VIRTUAL_KINDS else self.attribute_type

    @property
    def type_name(self) -> str:
        """The AttributeTypeName metadata reports."""
        return _VIRTUAL_KINDS.get(self.attribute_type, f"{self.attribute_type}Type")

    @property
    def behavior(self) -> str | None:
        """A DateTime column's DateTimeBehavior (None for other kinds)."""
        if self.attribute_type != "DateTime":
            return None
        return self.date_behavior or "UserLocal"

    @property
    def value_type(self) -> str:
        """How row values compare and what Edm type they have: the AttributeType, except
        "Date" for a DateOnly DateTime (Edm.Date: a calendar date, no time, no zone)."""
        return "Date" if self.behavior == "DateOnly" else self.attribute_type

    @property
    def column(self) -> str:
        """The key this attribute has in an API row."""
        return f"_{self.logical_name}_value" if self.is_lookup else self.logical_name


@dataclass
class SimEntity:
    """One table: names, key, columns, and whether change tracking is enabled."""

    entity_set_name: str
    logical_name: str
    primary_id_attribute: str
    attributes: list[SimAttribute]
    change_tracking_enabled: bool
    row_count: int
    primary_name_attribute: str | None = None
    is_intersect: bool = False

    def __post_init__(self) -> None:
        # Dataverse always lists the primary key among the attributes.
        if all(a.logical_name != self.primary_id_attribute for a in self.attributes):
            self.attributes = [
                SimAttribute(self.primary_id_attribute, "Uniqueidentifier"),
                *self.attributes,
            ]

    @property
    def has_modifiedon(self) -> bool:
        """Tables without modifiedon (intersect tables) can only be synced as snapshots."""
        return any(a.logical_name == "modifiedon" for a in self.attributes)

    @property
    def has_createdon(self) -> bool:
        """Whether rows carry createdon."""
        return any(a.logical_name == "createdon" for a in self.attributes)

    @property
    def columns(self) -> list[str]:
        """Row keys (excluding `@odata.etag`) in the order rows carry them."""
        return [a.column for a in self.attributes if not a.is_virtual]

    @property
    def column_types(self) -> dict[str, str]:
        """Row key -> value type (see SimAttribute.value_type) for every non-virtual attribute."""
        return {a.column: a.value_type for a in self.attributes if not a.is_virtual}

    def attribute(self, logical_name: str) -> SimAttribute | None:
        """The attribute with this logical name (or row key), if any."""
        for a in self.attributes:
            if a.logical_name == logical_name or (a.is_lookup and a.column == logical_name):
                return a
        return None


def _a(
    name: str, attribute_type: str, *targets: str, nullable: bool = False
) -> SimAttribute:
    return SimAttribute(name, attribute_type, tuple(targets), nullable)


def _late(name: str, attribute_type: str, *targets: str, nullable: bool = True,
          **options: Any) -> SimAttribute:
    """A column added after the first release (see SimAttribute.late)."""
    return SimAttribute(name, attribute_type, tuple(targets), nullable, late=True, **options)


def _with_virtuals(attributes: list[SimAttribute]) -> list[SimAttribute]:
    """Add the `<column>name` Virtual attributes real orgs expose for option-set columns."""
    virtuals = [
        SimAttribute(f"{a.logical_name}name", "Virtual", attribute_of=a.logical_name)
        for a in attributes
        if a.attribute_type in _VIRTUAL_NAME_FOR
    ]
    return attributes + virtuals


_STAMPS = [_a("createdon", "DateTime"), _a("modifiedon", "DateTime")]

# entity set -> (logical name, primary key, primary name, change tracking, rows, attributes)
_BUILTIN: dict[str, tuple[str, str, str | None, bool, int, list[SimAttribute]]] = {
    "accounts": (
        "account", "accountid", "name", True, 600,
        [
            _a("name", "String"),
            _a("accountnumber", "String", nullable=True),
            _a("description", "Memo", nullable=True),
            _a("revenue", "Money", nullable=True),
            _a("numberofemployees", "Integer", nullable=True),
            _a("industrycode", "Picklist", nullable=True),
            _a("statecode", "State"),
            _a("statuscode", "Status"),
            _a("emailaddress1", "String", nullable=True),
            _a("telephone1", "String", nullable=True),
            _a("address1_city", "String", nullable=True),
            _a("primarycontactid", "Lookup", "contact", nullable=True),
            _a("ownerid", "Owner", "systemuser", "team"),
            _a("versionnumber", "BigInt"),
            *_STAMPS,
            # A money column brings the record's currency, its rate and the base-currency value.
            _late("transactioncurrencyid", "Lookup", "transactioncurrency", nullable=False),
            _late("exchangerate", "Decimal", nullable=False),
            _late("revenue_base", "Money", attribute_of="revenue", is_base_currency=True),
        ],
    ),
    "contacts": (
        "contact", "contactid", "fullname", True, 1500,
        [
            _a("firstname", "String"),
            _a("lastname", "String"),
            _a("fullname", "String"),
            _a("emailaddress1", "String", nullable=True),
            _a("jobtitle", "String", nullable=True),
            _a("parentcustomerid", "Customer", "account", "contact", nullable=True),
            SimAttribute("birthdate", "DateTime", nullable=True, date_behavior="DateOnly"),
            _a("statecode", "State"),
            _a("statuscode", "Status"),
            _a("ownerid", "Owner", "systemuser", "team"),
            *_STAMPS,
            # The record image: the image itself is never in rows, its companions are.
            _late("entityimage", "Image"),
            _late("entityimageid", "Uniqueidentifier"),
            _late("entityimage_timestamp", "BigInt", attribute_of="entityimage"),
            _late("entityimage_url", "String", attribute_of="entityimage"),
        ],
    ),
    "systemusers": (
        "systemuser", "systemuserid", "fullname", False, 40,
        [
            _a("fullname", "String"),
            _a("domainname", "String"),
            _a("internalemailaddress", "String"),
            _a("isdisabled", "Boolean"),
            _a("businessunitid", "Lookup", "businessunit"),
            *_STAMPS,
        ],
    ),
    "businessunits": (
        "businessunit", "businessunitid", "name", False, 5,
        [
            _a("name", "String"),
            _a("parentbusinessunitid", "Lookup", "businessunit", nullable=True),
            *_STAMPS,
        ],
    ),
    "teams": (
        "team", "teamid", "name", True, 12,
        [
            _a("name", "String"),
            _a("teamtype", "Picklist"),
            _a("businessunitid", "Lookup", "businessunit"),
            *_STAMPS,
        ],
    ),
    "vin_candidates": (
        "vin_candidate", "vin_candidateid", "vin_name", True, 800,
        [
            _a("vin_name", "String"),
            _a("vin_score", "Decimal", nullable=True),
            _a("vin_stage", "Picklist"),
            _a("vin_enrolled", "Boolean"),
            _a("vin_notes", "Memo", nullable=True),
            _a("vin_primaryaccountid", "Lookup", "account", nullable=True),
            _a("statecode", "State"),
            *_STAMPS,
            _late("vin_therapeuticareas", "MultiSelectPicklist", option_set="vin_therapeuticarea"),
            _late("vin_regardingobjectid", "Lookup", "account", "contact"),
            _late("vin_resume", "File"),
            _late("vin_resume_name", "String", attribute_of="vin_resume"),
        ],
    ),
    "vin_clinicaltrials": (
        "vin_clinicaltrial", "vin_clinicaltrialid", "vin_name", False, 60,
        [
            _a("vin_name", "String"),
            _a("vin_phase", "Picklist"),
            SimAttribute("vin_startdate", "DateTime", date_behavior="DateOnly"),
            _a("vin_budget", "Money"),
            _a("vin_sponsorid", "Lookup", "account"),
            _a("statecode", "State"),
            *_STAMPS,
            _late("vin_therapeuticarea", "Picklist", option_set="vin_therapeuticarea"),
        ],
    ),
    # Benchmark only (benchmarks/run_all.py; not in entities_config.json): a wide custom table,
    # 30 columns per row (key, 27 values of every common type, createdon, modifiedon).
    "vin_benchmarkrows": (
        "vin_benchmarkrow", "vin_benchmarkrowid", "vin_name", True, 1000,
        [
            _a("vin_name", "String"),
            _a("vin_code", "String"),
            _a("vin_email", "String", nullable=True),
            _a("vin_city", "String", nullable=True),
            _a("vin_phone", "String", nullable=True),
            _a("vin_description", "Memo", nullable=True),
            _a("vin_notes", "Memo", nullable=True),
            _a("vin_quantity", "Integer"),
            _a("vin_rank", "Integer", nullable=True),
            _a("vin_sequence", "BigInt"),
            _a("vin_amount", "Money"),
            _a("vin_cost", "Money", nullable=True),
            _a("vin_ratio", "Decimal"),
            _a("vin_weight", "Double", nullable=True),
            _a("vin_active", "Boolean"),
            _a("vin_flagged", "Boolean"),
            _a("vin_category", "Picklist"),
            _a("vin_priority", "Picklist", nullable=True),
            _a("statecode", "State"),
            _a("statuscode", "Status"),
            _a("vin_duedate", "DateTime", nullable=True),
            _a("vin_closedon", "DateTime", nullable=True),
            _a("vin_externalid", "Uniqueidentifier"),
            _a("vin_accountid", "Lookup", "account", nullable=True),
            _a("vin_contactid", "Lookup", "contact", nullable=True),
            _a("ownerid", "Owner", "systemuser", "team"),
            _a("versionnumber", "BigInt"),
            *_STAMPS,
        ],
    ),
}

# Intersect tables of N:N relationships: entity set -> (logical, pk, columns, rows).
_INTERSECT: dict[str, tuple[str, str, list[SimAttribute], int]] = {
    "vin_vin_candidate_accountset": (
        "vin_vin_candidate_account", "vin_vin_candidate_accountid",
        [_a("vin_candidateid", "Uniqueidentifier", "vin_candidate"),
         _a("accountid", "Uniqueidentifier", "account")],
        700,
    ),
    "vin_vin_clinicaltrial_contactset": (
        "vin_vin_clinicaltrial_contact", "vin_vin_clinicaltrial_contactid",
        [_a("vin_clinicaltrialid", "Uniqueidentifier", "vin_clinicaltrial"),
         _a("contactid", "Uniqueidentifier", "contact")],
        900,
    ),
    "vin_vin_candidate_clinicaltrialset": (
        "vin_vin_candidate_clinicaltrial", "vin_vin_candidate_clinicaltrialid",
        [_a("vin_candidateid", "Uniqueidentifier", "vin_candidate"),
         _a("vin_clinicaltrialid", "Uniqueidentifier", "vin_clinicaltrial")],
        500,
    ),
}

_FALLBACK_ROWS = 100


def entity_spec_for(entity_set_name: str, row_count: int | None = None) -> SimEntity:
    """The simulated org's spec for an entity set; unknown names get a generic table."""
    if entity_set_name in _BUILTIN:
        logical, pk, primary_name, tracked, rows, attributes = _BUILTIN[entity_set_name]
        return SimEntity(
            entity_set_name=entity_set_name,
            logical_name=logical,
            primary_id_attribute=pk,
            attributes=_with_virtuals([_a(pk, "Uniqueidentifier"), *attributes]),
            change_tracking_enabled=tracked,
            row_count=rows if row_count is None else row_count,
            primary_name_attribute=primary_name,
        )
    if entity_set_name in _INTERSECT:
        logical, pk, attributes, rows = _INTERSECT[entity_set_name]
        return SimEntity(
            entity_set_name=entity_set_name,
            logical_name=logical,
            primary_id_attribute=pk,
            attributes=[_a(pk, "Uniqueidentifier"), *attributes],
            change_tracking_enabled=False,
            row_count=rows if row_count is None else row_count,
            is_intersect=True,
        )
    logical = entity_set_name[:-1] if entity_set_name.endswith("s") else entity_set_name
    pk = f"{logical}id"
    return SimEntity(
        entity_set_name=entity_set_name,
        logical_name=logical,
        primary_id_attribute=pk,
        attributes=_with_virtuals(
            [_a(pk, "Uniqueidentifier"), _a("name", "String"), _a("statecode", "State"), *_STAMPS]
        ),
        change_tracking_enabled=True,
        row_count=_FALLBACK_ROWS if row_count is None else row_count,
        primary_name_attribute="name",
    )


# ---------------------------------------------------------------------------------------------
# Currencies and realistic text with the usual hazards
# ---------------------------------------------------------------------------------------------

_CURRENCY_NAMESPACE = uuid.UUID("8f0e4b6a-7c1d-4e2f-b3a5-9d6c0e1f2a47")


@dataclass(frozen=True)
class SimCurrency:
    """A transactioncurrency record: the org's currencies are fixed, the base one first."""

    code: str
    name: str
    symbol: str
    exchange_rate: float  # units of this currency per unit of the base currency
    precision: int = 2
    share: float = 0.0  # how many seeded records use it (the base currency takes the rest)

    @property
    def id(self) -> str:
        """Its transactioncurrencyid (the same in every simulated org)."""
        return str(uuid.uuid5(_CURRENCY_NAMESPACE, self.code))


CURRENCIES = (
    SimCurrency("USD", "US Dollar", "$", 1.0),
    SimCurrency("EUR", "Euro", "€", 0.9234, share=0.15),
    SimCurrency("CHF", "Swiss Franc", "CHF ", 0.8812, share=0.05),
)
BASE_CURRENCY = CURRENCIES[0]
_CURRENCY_BY_ID = {currency.id: currency for currency in CURRENCIES}


def money_base(amount: float | None, exchange_rate: float | None,
               precision: int = BASE_CURRENCY.precision) -> float | None:
    """A money value in the base currency: amount / exchange rate, rounded to the base
    currency's precision half to even, as .NET's decimal rounding behind Dataverse does."""
    if amount is None or not exchange_rate:
        return None
    value = Decimal(repr(amount)) / Decimal(repr(exchange_rate))
    return float(value.quantize(Decimal(1).scaleb(-precision), rounding=ROUND_HALF_EVEN))



_COMPANIES = [
    "Contoso", "Fabrikam", "Adventure Works", "Northwind Traders", "Litware", "Tailspin Toys",
    "Wingtip Toys", "Woodgrove Bank", "Proseware", "Alpine Ski House", "Coho Winery",
    "Fourth Coffee", "Lucerne Publishing", "Trey Research", "Wide World Importers",
    "Blue Yonder Airlines", "Humongous Insurance", "A. Datum", "Graphic Design Institute",
    "Southridge Video", "VanArsdel", "Relecloud", "Munson's Pickles",
]
_SUFFIXES = ["Ltd", "Inc.", "GmbH", "AG", "S.A.", "LLC", "plc", "Pharma", "Labs", ""]
# Values that break naive quoting, CSV, URL or encoding handling.
_HAZARD_NAMES = [
    "O'Bryan & Sons",
    'The "Best" Company',
    "Zürich Versicherung",
    "東京 Trading 株式会社",
    "Rocket 🚀 Labs",
    "Smith, Jones, and Partners",
    "",
    "100% Pure + Co #1",
    "Ünïcödé Straße",
    "Back\\slash Inc",
    "Semi;colon & Question? Ltd",
    "Line\nBreak GmbH",
    "  Padded  ",
    "Tab\tSeparated",
    "Ac'me ''Double'' Quotes",
]
_HAZARD_SURNAMES = [
    "O'Bryan", '"Nick" Nickerson', "Smith, Jr.", "", "Müller-Lüdenscheidt", "山田 太郎",
    "Rocket 🚀", "  Spaces  ", "Back\\slash", "100% + #1",
]
_NULL_RATE = {"description": 0.3, "vin_notes": 0.35, "jobtitle": 0.2, "birthdate": 0.25,
              "entityimageid": 0.7, "vin_resume": 0.6, "vin_therapeuticareas": 0.2}
# Polymorphic lookups: how many seeded rows point at a table other than the first target.
_OTHER_TARGET_RATE = 0.3
_FILE_NAMES = [
    "CV.pdf", "Lebenslauf 2025.docx", "résumé (final).pdf", "cv_O'Bryan.pdf", "履歴書.pdf",
    "CV, short version.docx", "scan 🚀.png", "curriculum-vitae.PDF",
]
_FIRST_NAMES = [
    "Anna", "Bob", "Chloé", "Dmitri", "Émile", "Fatima", "Giulia", "Hiro", "Ingrid", "José",
    "Kwame", "Li", "María", "Nils", "Olu", "Priya", "Quentin", "Renée", "Søren", "Tomás", "Zoë",
    "太郎", "Mary-Jane", "D'Arcy",
]
_LAST_NAMES = [
    "Smith", "Johnson", "O'Bryan", "Müller", "Nguyen", "García", "O'Neil", "D'Angelo", "Brown",
    "Lee", "Kim", "Tanaka", "山田", "Øvergård", "Doe-Smith", "Wilson", "Anderson", "Schröder",
    "van der Berg", "Ó Súilleabháin",
]
_CITIES = [
    "Seattle", "Redmond", "Zürich", "東京", "São Paulo", "Kraków", "Montréal", "Reykjavík",
    "München", "New York, NY", "O'Fallon", "Basel", "Genève", "Cape Town", "", "Zürich",
]
_JOB_TITLES = [
    "Principal Investigator", "Study Coordinator", "Research Nurse", "CRA", "Head of R&D",
    "Data Manager", "Sponsor \"Liaison\"", "Director, Clinical Ops", "Médecin-chef", "",
]
_SENTENCES = [
    "Met at the annual conference.",
    "Prefers email; do not call before 9am.",
    'Said "maybe next quarter".',
    "Follow-up: O'Bryan's team, Zürich office.",
    "Budget approved — waiting for PO.",
    "東京オフィスと連絡済み。",
    "Uses 🚀 emoji in every mail.",
    "Line one\nLine two\r\nLine three",
    "Tabs\tand, commas, everywhere.",
    "Contract value ≥ 1,000,000 €.",
    "50% discount + free shipping & handling #promo",
]
_BUSINESS_UNITS = ["Contoso Pharma", "Research", "Clinical Operations", "Sales EMEA", "Zürich Lab"]
_TEAM_WORDS = ["Oncology", "Cardiology", "Sales", "Site Monitoring", "Data Science", "Regulatory"]
_TRIAL_TOPICS = [
    "efficacy of VX-101 in adults", "long-term safety of VX-220", "dose finding for VX-7",
    "VX-101 vs placebo (double-blind)", "paediatric formulation, 'Kids' arm",
]


def _ascii_slug(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _random_guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _random_stamp(rng: random.Random, start: datetime, end: datetime) -> datetime:
    span = int((end - start).total_seconds())
    return start + timedelta(seconds=rng.randrange(span))


def _guid_number(guid: str) -> int:
    return int(guid.replace("-", ""), 16)


def _image_timestamp(image_id: str) -> int:
    """An image's EntityImage_Timestamp: .NET ticks of its upload, a moment in 2024-2025 that
    its id fixes."""
    return 638_396_640_000_000_000 + _guid_number(image_id) % 630_720_000_000_000


def _date_text(value: Any) -> str:
    """A DateOnly value on the wire ("YYYY-MM-DD") from a date, datetime or ISO text."""
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return date.fromisoformat(str(value).strip()[:10]).isoformat()


def _is_derived(spec: SimEntity, attribute: SimAttribute) -> bool:
    """Columns Dataverse computes from others of the same row rather than storing what a
    client sent: a money column's base value, the currency's exchange rate, an image's URL and
    timestamp, a file's name."""
    if attribute.is_base_currency or attribute.logical_name == "exchangerate":
        return True
    source = spec.attribute(attribute.attribute_of) if attribute.attribute_of else None
    return source is not None and source.attribute_type in ("Image", "File")


# change_column_type: how a value becomes the new kind unless the caller says otherwise.
_DEFAULT_CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "string": str, "int": int, "number": float, "bool": bool,
}


# ---------------------------------------------------------------------------------------------
# Runtime state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimRequest:
    """One Web API request as the simulator saw it (times from time.monotonic)."""

    arrived: float
    finished: float
    method: str
    target: str  # path and query string
    entity: str | None
    status: int
    fault: str | None = None
    retry_after: float | None = None  # the Retry-After of a 429
    rows: int | None = None  # rows a data request served (None: not a data answer)
    execution_seconds: float | None = None  # what the limits counted (admitted requests)
    latency_seconds: float = 0.0  # the latency model's delay for this request


# The request log keeps the most recent requests only, so a long-running simulator stays small.
REQUEST_LOG_SIZE = 100_000


@dataclass
class SimStats:
    """Request counters a test can assert on (e.g. how many pages a sync needed)."""

    requests: int = 0
    requests_by_entity: Counter[str] = field(default_factory=Counter)
    rows_served: Counter[str] = field(default_factory=Counter)
    token_requests: int = 0
    metadata_requests: int = 0
    status_counts: Counter[int] = field(default_factory=Counter)
    # Service protection: 429s sent (and by error code), requests sent while throttled.
    throttled: int = 0
    throttled_by_code: Counter[str] = field(default_factory=Counter)
    requests_while_throttled: int = 0
    # The most Web API requests in flight at once.
    max_concurrency: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    request_log: deque[SimRequest] = field(
        default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE)
    )

    def reset(self) -> None:
        """Zero every counter in place (callers may hold a reference to this object)."""
        self.requests = 0
        self.token_requests = 0
        self.metadata_requests = 0
        self.requests_by_entity.clear()
        self.rows_served.clear()
        self.status_counts.clear()
        self.throttled = 0
        self.throttled_by_code.clear()
        self.requests_while_throttled = 0
        self.max_concurrency = 0
        self.faults.clear()
        self.request_log.clear()


@dataclass
class EntityTable:
    """Rows of one table plus the indexes paging and change tracking need."""

    spec: SimEntity
    column_types: dict[str, str]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Sorted SQL-order keys of every pk: default-order paging is a bisect plus a slice.
    order_keys: list[str] = field(default_factory=list)
    key_to_pk: dict[str, str] = field(default_factory=dict)
    # (version, pk, "upsert" | "delete"), appended in version order.
    changes: list[tuple[int, str, str]] = field(default_factory=list)
    change_versions: list[int] = field(default_factory=list)
    # Bumped on every mutation; invalidates cached sort orders.
    data_version: int = 0
    # pk -> {row key: target logical name}, for lookups that can point at several tables.
    lookup_targets: dict[str, dict[str, str]] = field(default_factory=dict)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    cache: dict[Any, Any] = field(default_factory=dict)
    # Set for tables generated on demand (rows, order_keys, key_to_pk are then lazy views).
    lazy: LazyRowSource | None = None

    def rows_in_order(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows at positions [start, stop) of the primary-key order."""
        if isinstance(self.rows, LazyRows):
            return self.rows.in_order(start, stop)
        rows, key_to_pk = self.rows, self.key_to_pk
        return [rows[key_to_pk[k]] for k in self.order_keys[start:stop]]

    def iter_order_keys(self, start: int, stop: int) -> Iterator[str]:
        """Order keys at positions [start, stop), without copying a lazy index."""
        if isinstance(self.order_keys, LazyKeyIndex):
            return self.order_keys.iter_range(start, stop)
        return iter(self.order_keys[start:stop])

    def add_key(self, pk: str) -> None:
        """Index a new primary key."""
        key = guid_order_key(pk)
        bisect.insort(self.order_keys, key)
        self.key_to_pk[key] = pk

    def remove_key(self, pk: str) -> None:
        """Drop a primary key from the index."""
        key = guid_order_key(pk)
        index = bisect.bisect_left(self.order_keys, key)
        if index < len(self.order_keys) and self.order_keys[index] == key:
            del self.order_keys[index]
        self.key_to_pk.pop(key, None)

    def record_change(self, version: int, pk: str, kind: str) -> None:
        """Append to the change log and invalidate caches."""
        self.changes.append((version, pk, kind))
        self.change_versions.append(version)
        self.data_version += 1
        self.cache.clear()


class DataverseSimulator:
    """An in-memory Dataverse org: deterministic seeded tables, a clock, tokens and stats."""

    def __init__(
        self,
        entity_names: Iterable[str],
        *,
        seed: int = 42,
        row_counts: dict[str, int] | None = None,
        token_lifetime_seconds: int = 3599,
        delta_token_lifetime_seconds: int = 7 * 24 * 3600,
        org_url: str | None = None,
        lazy_entities: Iterable[str] = (),
        strict_clock: bool = False,
        paging: str = "cookie",
        delta_token_moment: str = "first_page",
        latency: LatencyModel | None = None,
    ) -> None:
        """An org with these entity sets.

        `row_counts` overrides the default size per entity set. Tables in `lazy_entities`, and
        any table of more than LAZY_ROW_THRESHOLD rows, are generated on demand from each row's
        index (a million rows cost a few megabytes); intersect tables are always held.

        How far paging can be trusted, as Microsoft leaves open (DATAVERSE.md, "Paging is not
        always a snapshot"): `paging="page_number"` serves page N as the N-th slice of the
        result as it is when that page is asked for (legacy paging without a cookie: a row
        inserted, deleted or moved ahead of the slice since the last page makes one row
        served twice or skipped); the default `"cookie"` continues after the last row served.
        `delta_token_moment="last_page"` issues a read's delta token for the moment its last
        page is served, so a row changed after an earlier page served it is in no delta; the
        default `"first_page"` pins the read's first moment.

        `latency` (simulator/latency.py) makes each data request take time, awaited without
        blocking the server; None (the default) answers at once.
        """
        if paging not in ("cookie", "page_number"):
            raise ValueError("paging is 'cookie' or 'page_number'")
        if delta_token_moment not in ("first_page", "last_page"):
            raise ValueError("delta_token_moment is 'first_page' or 'last_page'")
        self.paging = paging
        self.delta_token_moment = delta_token_moment
        names = list(dict.fromkeys(entity_names))
        row_counts = row_counts or {}
        lazy_names = set(lazy_entities)
        self.seed = seed
        self.token_lifetime_seconds = token_lifetime_seconds
        self.delta_token_lifetime_seconds = delta_token_lifetime_seconds
        self.org_url = org_url.rstrip("/") if org_url else None
        self.tenant_id = SIMULATOR_TENANT_ID
        self.client_id = SIMULATOR_CLIENT_ID
        self.client_secret = SIMULATOR_CLIENT_SECRET
        self.organization_id = str(uuid.UUID(int=random.Random(seed).getrandbits(128), version=4))
        self.stats = SimStats()
        # Re-entrant: mutations call now() while holding it.
        self.lock = threading.RLock()
        self._tokens: dict[str, float] = {}
        self._token_clients: dict[str, str] = {}
        self._read_denied: dict[str, set[str] | None] = {}  # entity set -> clients (None: all)
        self.in_flight = 0  # Web API requests being served right now (all apps of this org)
        self._protection = ServiceProtection(ServiceProtectionLimits())
        self._latency: LatencyModel | None = None
        self._latency_rng = random.Random(0)
        # How the gateway waits out a latency delay; tests put a fake here (no timed tests).
        self.latency_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        if latency is not None:
            self.latency = latency
        self._fault_board = FaultBoard()
        self._fault_rng = random.Random(seed * 104_729 + 3)
        self._delta_min_version = 0
        self._version = 1000
        # Data responses already rendered, for the realistic benchmark (off: None): a real org
        # renders its pages on its own servers, this one on the client's cores, one at a time.
        # A GET is answered again from here while nothing in the org changed (the key holds
        # the org's version); faults, limits, latency and the request log apply as ever.
        self.response_cache: dict[tuple, tuple[Any, bytes, int | None]] | None = None
        self._last_issued = _SEED_START
        self.strict_clock = strict_clock
        self._mutation_rng = random.Random(seed * 7919 + 17)
        # The calling user's language: labels in metadata and formatted values use it.
        self.user_language_code = BASE_LANGUAGE
        # Microsoft's docs say an attribute using a global set has OptionSet null and the set
        # in GlobalOptionSet; orgs send it in both. True serves the docs' reading.
        self.option_set_null_when_global = False
        # The reported quirk (DATAVERSE.md): a change-tracking read with annotations loses
        # @odata.deltaLink on its last page. True does it to every such read.
        self.omit_delta_link_with_annotations = False
        self._option_sets: dict[str, SimOptionSet] = {}
        self._derived_by_table: dict[str, tuple[list[SimAttribute], frozenset[str]]] = {}
        self._tables: dict[str, EntityTable] = {}
        self._by_logical: dict[str, EntityTable] = {}
        for name in names:
            spec = entity_spec_for(name, row_counts.get(name))
            table = EntityTable(spec=spec, column_types=spec.column_types)
            if (name in lazy_names or spec.row_count > LAZY_ROW_THRESHOLD) and not (
                spec.is_intersect
            ):
                table.lazy = LazyRowSource(
                    count=max(spec.row_count, 0),
                    seed=self.seed * 1_000_003 + zlib.crc32(name.encode("utf-8")),
                    primary_key=spec.primary_id_attribute,
                )
            self._tables[name] = table
            self._by_logical[spec.logical_name] = table
        self._seed_all()

    # -- lookups -------------------------------------------------------------------------------

    @property
    def entity_set_names(self) -> list[str]:
        """Entity sets this org has, in construction order."""
        return list(self._tables)

    @property
    def version(self) -> int:
        """The org-wide row version most recently issued."""
        return self._version

    def spec(self, entity_set: str) -> SimEntity:
        """The spec of one entity set (KeyError if the org does not have it)."""
        return self._tables[entity_set].spec

    def table(self, entity_set: str) -> EntityTable:
        """Internal state of one table (for the HTTP layer)."""
        return self._tables[entity_set]

    def find_table(self, entity_set: str) -> EntityTable | None:
        """The table for an entity set name, or None."""
        return self._tables.get(entity_set)

    def table_by_logical(self, logical_name: str) -> EntityTable | None:
        """The table with this logical name, or None."""
        return self._by_logical.get(logical_name)

    def tables(self) -> list[EntityTable]:
        """Every table, in construction order."""
        return list(self._tables.values())

    # -- clock -----------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The stamp for a write happening now: whole seconds, never earlier than a stamp
        issued or seeded before.

        As in Dataverse, writes within one second share their `modifiedon`, so a client that
        reads up to watermark W and later asks for `modifiedon gt W` misses a record written
        in W's second after its read (`ge W` does not). With `strict_clock` every stamp is
        instead at least a second after the last one, an easier clock than Dataverse's.
        """
        with self.lock:
            real = datetime.now(UTC).replace(microsecond=0)
            step = timedelta(seconds=1 if self.strict_clock else 0)
            stamp = max(real, self._last_issued + step)
            self._last_issued = stamp
            return stamp

    def advance_clock(self, seconds: float) -> datetime:
        """Jump the simulator clock forward (e.g. past the delta-token lifetime); returns it."""
        with self.lock:
            self._last_issued = self._peek_clock() + timedelta(seconds=seconds)
            return self._last_issued

    def _peek_clock(self) -> datetime:
        real = datetime.now(UTC).replace(microsecond=0)
        return max(real, self._last_issued)

    def _observe_stamp(self, text: str | None) -> None:
        if text:
            stamp = parse_datetime(text)
            if stamp > self._last_issued:
                self._last_issued = stamp

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    # -- access tokens ---------------------------------------------------------------------------

    def issue_access_token(self, client_id: str | None = None) -> str:
        """Mint an opaque bearer token valid for token_lifetime_seconds, issued to client_id
        (the user whose service protection limits its requests count against)."""
        with self.lock:
            if len(self._tokens) > 10_000:
                current = time.monotonic()
                self._tokens = {t: e for t, e in self._tokens.items() if e > current}
                self._token_clients = {
                    t: c for t, c in self._token_clients.items() if t in self._tokens
                }
            token = secrets.token_urlsafe(32)
            self._tokens[token] = time.monotonic() + self.token_lifetime_seconds
            self._token_clients[token] = client_id or self.client_id
            return token

    def issued_access_tokens(self) -> list[str]:
        """Every access token issued so far (tests check none leaks into logs or archives)."""
        with self.lock:
            return list(self._tokens)

    def token_client(self, token: str) -> str | None:
        """The client a valid token was issued to; None for unknown or expired tokens."""
        if self.access_token_state(token) != "valid":
            return None
        return self._token_clients.get(token)

    def access_token_state(self, token: str) -> str:
        """"valid", "expired" or "unknown"."""
        expiry = self._tokens.get(token)
        if expiry is None:
            return "unknown"
        return "valid" if time.monotonic() < expiry else "expired"

    def expire_all_tokens(self) -> None:
        """Make every issued access token expired (tests of refresh-on-401)."""
        with self.lock:
            for token in self._tokens:
                self._tokens[token] = float("-inf")

    # -- security roles ----------------------------------------------------------------------------

    def deny_read(self, entity_set: str, client_id: str | None = None) -> None:
        """Take the read privilege on a table away from one application user (or from every
        user): its reads then answer 403, as Dataverse does for a role without prvRead."""
        with self.lock:
            self.table(entity_set)  # KeyError for a table the org does not have
            if client_id is None:
                self._read_denied[entity_set] = None
            else:
                clients = self._read_denied.setdefault(entity_set, set())
                if clients is not None:
                    clients.add(client_id)

    def allow_read(self, entity_set: str) -> None:
        with self.lock:
            self._read_denied.pop(entity_set, None)

    def may_read(self, entity_set: str, client_id: str | None) -> bool:
        with self.lock:
            if entity_set not in self._read_denied:
                return True
            clients = self._read_denied[entity_set]
            return clients is not None and client_id not in clients

    # -- service protection and faults -----------------------------------------------------------

    @property
    def limits(self) -> ServiceProtectionLimits:
        """Service protection limits per user (default: none). Setting them starts afresh."""
        return self._protection.limits

    @limits.setter
    def limits(self, limits: ServiceProtectionLimits) -> None:
        with self.lock:
            self._protection = ServiceProtection(limits)

    @property
    def latency(self) -> LatencyModel | None:
        """How long data requests take (default None: at once). See simulator/latency.py."""
        return self._latency

    @latency.setter
    def latency(self, latency: LatencyModel | None) -> None:
        with self.lock:
            self._latency = latency
            self._latency_rng = latency.rng() if latency is not None else random.Random(0)

    def latency_delay(self, rows: int) -> float:
        """The latency model's delay for a data request that served `rows` rows (0 if off)."""
        with self.lock:
            if self._latency is None:
                return 0.0
            return self._latency.delay(rows, self._latency_rng)

    @property
    def protection(self) -> ServiceProtection:
        """The limits' runtime state (the HTTP layer admits requests through it)."""
        return self._protection

    @property
    def fault_plan(self) -> FaultPlan | None:
        """A seeded random fault scenario applied to every Web API request, or None."""
        return self._fault_board.plan

    @fault_plan.setter
    def fault_plan(self, plan: FaultPlan | None) -> None:
        with self.lock:
            self._fault_board.plan = plan

    def inject(self, kind: str, count: int = 1, **options: Any) -> Fault:
        """Give the next `count` matching Web API requests a fault (see simulator.faults);
        options: entity, after, status, body, seconds, chunk, rows, paging_only, link, host."""
        with self.lock:
            return self._fault_board.add(Fault(kind, count=count, **options))

    def expects_response_faults(self) -> bool:
        """Whether a fault may still be drawn for a response (the gateway then inspects it)."""
        with self.lock:
            return self._fault_board.expects_response_faults()

    def clear_faults(self) -> None:
        """Drop pending injected faults and the fault plan."""
        with self.lock:
            self._fault_board.clear()

    def draw_fault(self, entity: str | None, paging: bool, collection: bool,
                   after_response: bool = False) -> Fault | None:
        """The fault for one request, or with after_response for its response once it is known
        to have what the fault changes (counted in stats.faults), or None."""
        with self.lock:
            fault = self._fault_board.draw(entity, paging, collection, after_response)
            if fault is not None:
                self.stats.faults[fault.kind] += 1
            return fault

    def mutate_for_fault(self, entity_set: str, kind: str, rows: int,
                         pks: Sequence[str] = ()) -> list[str]:
        """Update (`modify_records`) or delete (`delete_records`) existing rows of an entity
        set, as another user would while a client pages: `pks` if given (those still there),
        else `rows` random ones; returns their keys."""
        with self.lock:
            table = self._tables[entity_set]
            keys = table.order_keys
            if pks:
                chosen = [pk for pk in pks if pk in table.rows]
            else:
                picked = self._fault_rng.sample(range(len(keys)), min(rows, len(keys)))
                chosen = [table.key_to_pk[keys[i]] for i in picked]
            touched: list[str] = []
            for pk in chosen:
                if kind == "delete_records":
                    self.delete(entity_set, pk)
                elif table.spec.is_intersect:
                    continue  # intersect rows have nothing to edit but their links
                else:
                    name = table.spec.primary_name_attribute
                    current = table.rows[pk].get(name) if name else None
                    changes = {name: f"{current} (edited)"} if isinstance(current, str) else {}
                    self.update(entity_set, pk, changes)
                touched.append(pk)
            return touched

    # -- delta tokens ----------------------------------------------------------------------------

    def issue_delta_token(self, version: int) -> str:
        """`<version>!<MM/dd/yyyy HH:mm:ss>` as Dataverse formats it (not URL-encoded)."""
        # Peek, not now(): issuing tokens must not push the clock ahead of real time.
        stamp = self._peek_clock()
        return f"{version}!{stamp:%m/%d/%Y %H:%M:%S}"

    def check_delta_token(self, token: str) -> int:
        """The version a delta token stands for; raises the Dataverse error when unusable."""
        version_text, _, stamp_text = token.partition("!")
        try:
            version = int(version_text)
            stamp = datetime.strptime(stamp_text, "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        except ValueError as exc:
            raise ODataQueryError(
                f"The delta token '{token}' is not valid.", code=INVALID_ARGUMENT_CODE
            ) from exc
        if version > self._version:
            raise ODataQueryError(
                f"The delta token '{token}' is not valid.", code=INVALID_ARGUMENT_CODE
            )
        expired_by_age = (
            self._peek_clock() - stamp
        ).total_seconds() > self.delta_token_lifetime_seconds
        expired_by_test = version < self._delta_min_version
        if expired_by_age or expired_by_test:
            raise ODataQueryError(EXPIRED_VERSION_MESSAGE, code=EXPIRED_VERSION_CODE)
        return version

    def expire_delta_tokens(self) -> None:
        """Make every delta token issued so far expired (tests of the full-sync fallback)."""
        with self.lock:
            # Tokens carry versions, so advancing the version marks all older ones; versions
            # are org-wide and need not belong to a row change.
            self._delta_min_version = self._next_version()

    def reset_stats(self) -> None:
        """Zero the request counters."""
        with self.lock:
            self.stats.reset()

    # -- seeding ---------------------------------------------------------------------------------

    def _rng_for(self, entity_set: str) -> random.Random:
        # crc32, not hash(): str hashes are salted per process.
        return random.Random(self.seed * 1_000_003 + zlib.crc32(entity_set.encode("utf-8")))

    def _seed_all(self) -> None:
        order = sorted(self._tables)
        rngs = {name: self._rng_for(name) for name in order}
        pk_lists: dict[str, list[str]] = {}
        # Phase 1: every key first, so lookups can point at rows of any table.
        for name in order:
            table, rng = self._tables[name], rngs[name]
            if table.lazy is not None:
                keys = LazyKeyIndex(table.lazy.count, table.lazy.order_key)
                table.order_keys = keys  # type: ignore[assignment]
                table.key_to_pk = DerivedKeyMap()  # type: ignore[assignment]
                table.rows = LazyRows(table.lazy, keys)
                continue
            pks: list[str] = []
            seen: set[str] = set()
            while len(pks) < max(table.spec.row_count, 0):
                pk = _random_guid(rng)
                if pk not in seen:
                    seen.add(pk)
                    pks.append(pk)
            pk_lists[name] = pks
            table.order_keys = sorted(guid_order_key(pk) for pk in pks)
            table.key_to_pk = {guid_order_key(pk): pk for pk in pks}
        # Phase 2: row contents, in a fixed table order so versions are reproducible.
        for name in order:
            table, rng = self._tables[name], rngs[name]
            if table.lazy is not None:
                self._seed_lazy(table, rng)
                continue
            if table.spec.is_intersect:
                self._seed_intersect(table, rng, pk_lists[name])
                continue
            for ordinal, pk in enumerate(pk_lists[name]):
                row = self._build_row(table, rng, pk, ordinal, stamp=None)
                table.rows[pk] = row
        for table in self._tables.values():
            if table.lazy is not None:
                # Lazy stamps stay inside the seed window; its end bounds them all.
                self._observe_stamp(format_datetime(_SEED_END))
                continue
            for row in table.rows.values():
                self._observe_stamp(row.get("modifiedon"))
                self._observe_stamp(row.get("createdon"))

    def _seed_intersect(self, table: EntityTable, rng: random.Random, pks: list[str]) -> None:
        left_attr, right_attr = table.spec.attributes[1], table.spec.attributes[2]
        left = self._key_pool(left_attr)
        right = self._key_pool(right_attr)
        wanted = len(pks)
        pairs: list[tuple[str, str]] = []
        if left and right:
            capacity = len(left) * len(right)
            if wanted > capacity // 2:
                every = [(a, b) for a in left for b in right]
                rng.shuffle(every)
                pairs = every[:wanted]
            else:
                seen: set[tuple[str, str]] = set()
                while len(pairs) < wanted:
                    pair = (rng.choice(left), rng.choice(right))
                    if pair not in seen:
                        seen.add(pair)
                        pairs.append(pair)
        else:
            # A side whose table is not in the org gets random (unique) GUIDs.
            for _ in range(wanted):
                a = rng.choice(left) if left else _random_guid(rng)
                b = rng.choice(right) if right else _random_guid(rng)
                pairs.append((a, b))
        # Fewer pairs than keys only when the joined tables are tiny.
        for pk in pks[len(pairs):]:
            table.remove_key(pk)
        for pk, (a, b) in zip(pks, pairs, strict=False):
            version = self._next_version()
            table.rows[pk] = {
                "@odata.etag": f'W/"{version}"',
                table.spec.primary_id_attribute: pk,
                left_attr.column: a,
                right_attr.column: b,
            }
            table.pairs.add((a, b))

    def _seed_lazy(self, table: EntityTable, rng: random.Random) -> None:
        """Template rows from the ordinary generator, then a block of versions for the seed."""
        assert table.lazy is not None
        count = min(table.lazy.count, LAZY_TEMPLATE_ROWS)
        templates: list[dict[str, Any]] = []
        targets: list[dict[str, str]] = []
        for ordinal in range(max(count, 1)):
            placeholder = f"00000000-0000-4000-8000-{ordinal:012x}"
            templates.append(self._build_row(table, rng, placeholder, ordinal, stamp=None))
            targets.append(table.lookup_targets.pop(placeholder, {}))
        table.lazy.set_templates(templates, targets, base_version=self._version,
                                 stamp_start=_SEED_START, stamp_end=_SEED_END)
        self._version += table.lazy.count

    def _key_pool(self, attribute: SimAttribute) -> list[str]:
        for target in attribute.targets:
            table = self._by_logical.get(target)
            if table is not None and table.order_keys:
                keys = table.order_keys
                # A lazy table lends an evenly spaced sample rather than a million keys.
                step = max(1, len(keys) // 10_000) if table.lazy is not None else 1
                return [table.key_to_pk[keys[i]] for i in range(0, len(keys), step)]
        return []

    # -- row generation --------------------------------------------------------------------------

    def _late_rng(self, spec: SimEntity, pk: str) -> random.Random:
        """The stream a row's late columns draw from: a function of the seed and the row alone
        (a str seed is hashed with SHA-512, not the per-process salted hash())."""
        return random.Random(f"{self.seed}:{spec.entity_set_name}:{pk}")

    def _pick_reference(
        self,
        table: EntityTable,
        attribute: SimAttribute,
        rng: random.Random,
        late: Callable[[], random.Random],
        pk: str,
    ) -> tuple[str | None, str]:
        """(GUID, target logical name) for a lookup, preferring existing target rows."""
        targets = list(attribute.targets) or ["systemuser"]
        if attribute.logical_name == "parentbusinessunitid":
            # A tree: the root has no parent and nobody is their own parent.
            existing = list(table.rows)
            if not existing:
                return None, targets[0]
            return rng.choice(existing), targets[0]
        present = [t for t in targets if t in self._by_logical and self._by_logical[t].order_keys]
        if not present:
            if targets[0] == "transactioncurrency":
                return self._pick_currency(rng).id, targets[0]
            return _random_guid(rng), targets[0]
        if attribute.attribute_type == "Owner" and len(present) > 1:
            target = present[0] if rng.random() < 0.85 else present[1]
        else:
            target = present[0]
        target_table = self._by_logical[target]
        key = rng.choice(target_table.order_keys)
        guid = target_table.key_to_pk[key]
        if attribute.attribute_type != "Owner" and len(present) > 1 and (
            late().random() < _OTHER_TARGET_RATE
        ):
            # The other targets came later: whether a row points at one is drawn from the row's
            # own stream, so the rows that keep the first target keep their values.
            other = late().choice(present[1:])
            other_table = self._by_logical[other]
            other_guid = other_table.key_to_pk[late().choice(other_table.order_keys)]
            if other_guid != pk:  # nobody is their own parent
                return other_guid, other
        return guid, target

    @staticmethod
    def _pick_currency(rng: random.Random) -> SimCurrency:
        draw = rng.random()
        for currency in CURRENCIES[1:]:
            if draw < currency.share:
                return currency
            draw -= currency.share
        return BASE_CURRENCY

    def _build_row(
        self,
        table: EntityTable,
        rng: random.Random,
        pk: str,
        ordinal: int,
        stamp: datetime | None,
    ) -> dict[str, Any]:
        """A full API-shaped row; stamp None means a seeded row with random history."""
        spec = table.spec
        version = self._next_version()
        row: dict[str, Any] = {"@odata.etag": f'W/"{version}"'}
        if stamp is None:
            created = _random_stamp(rng, _SEED_START, _SEED_END)
            modified = (
                created
                if rng.random() < 0.3
                else _random_stamp(rng, created, _SEED_END + timedelta(seconds=1))
            )
        else:
            created = modified = stamp
        derived = self._derived_columns(spec)
        streams: list[random.Random] = []

        def late() -> random.Random:
            # Made on first use: most rows of most tables never need it.
            if not streams:
                streams.append(self._late_rng(spec, pk))
            return streams[0]

        for attribute in spec.attributes:
            if attribute.is_virtual:
                continue
            name = attribute.logical_name
            draw = late() if attribute.late else rng
            if name == spec.primary_id_attribute:
                row[name] = pk
            elif name == "createdon":
                row[name] = format_datetime(created)
            elif name == "modifiedon":
                row[name] = format_datetime(modified)
            elif name == "versionnumber":
                row[name] = version
            elif name in derived:
                row[attribute.column] = self._derived(spec, attribute, row)
            elif attribute.is_lookup:
                if attribute.nullable and draw.random() < 0.12:
                    row[attribute.column] = None
                    continue
                guid, target = self._pick_reference(table, attribute, draw, late, pk)
                row[attribute.column] = guid
                if len(attribute.targets) > 1 and guid is not None:
                    table.lookup_targets.setdefault(pk, {})[attribute.column] = target
            else:
                row[name] = self._value(spec, attribute, draw, row, ordinal)
        return row

    def _derived_columns(self, spec: SimEntity) -> frozenset[str]:
        """Logical names of the table's derived columns (see _is_derived), kept until its
        attributes change (a schema change assigns a new list)."""
        cached = self._derived_by_table.get(spec.entity_set_name)
        if cached is None or cached[0] is not spec.attributes:
            names = frozenset(a.logical_name for a in spec.attributes
                              if not a.is_virtual and _is_derived(spec, a))
            cached = (spec.attributes, names)
            self._derived_by_table[spec.entity_set_name] = cached
        return cached[1]

    def _derived(self, spec: SimEntity, attribute: SimAttribute, row: Mapping[str, Any]) -> Any:
        """A column Dataverse computes from others of the row (see _is_derived)."""
        if attribute.is_base_currency:
            return money_base(row.get(attribute.attribute_of or ""), row.get("exchangerate"))
        if attribute.logical_name == "exchangerate":
            currency = _CURRENCY_BY_ID.get(row.get("_transactioncurrencyid_value") or "")
            return currency.exchange_rate if currency is not None else None
        owner = spec.attribute(attribute.attribute_of or "")
        assert owner is not None
        if owner.attribute_type == "File":
            file_id = row.get(owner.column)
            return None if file_id is None else _FILE_NAMES[_guid_number(file_id) % len(
                _FILE_NAMES)]
        # An image's companions follow its id: no image, no URL and no timestamp.
        image_id = row.get(f"{owner.logical_name}id")
        if image_id is None:
            return None
        timestamp = _image_timestamp(image_id)
        if attribute.logical_name.endswith("_timestamp"):
            return timestamp
        return (f"/Image/download.aspx?Entity={spec.logical_name}"
                f"&Attribute={owner.logical_name}&Id={image_id}&Timestamp={timestamp}")

    def _value(
        self,
        spec: SimEntity,
        attribute: SimAttribute,
        rng: random.Random,
        row: Mapping[str, Any],
        ordinal: int,
    ) -> Any:
        name, kind = attribute.logical_name, attribute.attribute_type
        if attribute.nullable and rng.random() < _NULL_RATE.get(name, 0.1):
            return None
        entity = spec.logical_name
        if kind == "String":
            return self._string(entity, name, rng, row, ordinal)
        if kind == "Memo":
            count = rng.randint(1, 4)
            return " ".join(rng.choice(_SENTENCES) for _ in range(count))
        if kind in ("Picklist", "State", "Status"):
            if name == "statecode":
                return 0 if rng.random() < 0.85 else 1
            if name == "statuscode":
                return 1 if row.get("statecode", 0) == 0 else 2
            return rng.choice(sorted(self._option_set_for(spec, attribute).values()))
        if kind == "MultiSelectPicklist":
            values = self._option_set_for(spec, attribute).values()
            chosen = rng.sample(values, min(len(values), rng.randint(1, 3)))
            return multi_select_value(sorted(chosen))
        if kind == "Boolean":
            return rng.random() < (0.1 if name == "isdisabled" else 0.5)
        if kind == "Integer":
            return rng.randint(1, 250_000)
        if kind == "BigInt":
            return rng.randint(1, 2**40)
        if kind == "Money":
            return round(rng.uniform(1_000, 5_000_000), rng.choice((2, 4)))
        if kind in ("Decimal", "Double"):
            return round(rng.uniform(0, 100), rng.choice((2, 3, 4)))
        if kind == "DateTime":
            if name == "birthdate":
                start, end = datetime(1950, 1, 1, tzinfo=UTC), datetime(2005, 1, 1, tzinfo=UTC)
                day = _random_stamp(rng, start, end)
                text = format_datetime(day.replace(hour=0, minute=0, second=0))
            else:
                start, end = datetime(2022, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
                text = format_datetime(_random_stamp(rng, start, end))
            # A DateOnly column holds the calendar day the same draw gave before it had a
            # behaviour (Edm.Date: "YYYY-MM-DD").
            return text[:10] if attribute.behavior == "DateOnly" else text
        if kind in ("Uniqueidentifier", "File"):
            return _random_guid(rng)
        return None

    def _string(
        self, entity: str, name: str, rng: random.Random, row: Mapping[str, Any], ordinal: int
    ) -> str:
        hazard = rng.random() < 0.08
        if name == "name" and entity == "businessunit":
            return _BUSINESS_UNITS[ordinal % len(_BUSINESS_UNITS)] + (
                f" {ordinal // len(_BUSINESS_UNITS)}" if ordinal >= len(_BUSINESS_UNITS) else ""
            )
        if name == "name" and entity == "team":
            return f"{rng.choice(_TEAM_WORDS)} Team {ordinal + 1}"
        if name == "name":
            if hazard:
                return rng.choice(_HAZARD_NAMES)
            number = f" {rng.randint(2, 99)}" if rng.random() < 0.2 else ""
            return f"{rng.choice(_COMPANIES)} {rng.choice(_SUFFIXES)}".strip() + number
        if name == "firstname":
            return rng.choice(_FIRST_NAMES)
        if name == "lastname":
            return rng.choice(_HAZARD_SURNAMES) if hazard else rng.choice(_LAST_NAMES)
        if name == "fullname":
            if "firstname" in row:
                return f"{row['firstname']} {row['lastname']}".strip()
            return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        if name == "vin_name" and entity == "vin_candidate":
            return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        if name == "vin_name":
            return f"VIN-{2024 + ordinal % 3}-{ordinal:03d}: {rng.choice(_TRIAL_TOPICS)}"
        if name in ("emailaddress1", "internalemailaddress", "domainname"):
            source = row.get("fullname") or row.get("name") or "user"
            slug = _ascii_slug(str(source))[:24] or f"user{ordinal}"
            domain = "contoso.onmicrosoft.com" if entity == "systemuser" else "example.com"
            return f"{slug}{ordinal}@{domain}"
        if name == "accountnumber":
            return f"ACC-{rng.randint(0, 999_999):06d}"
        if name == "telephone1":
            return rng.choice(
                [
                    f"+1-425-555-{rng.randint(0, 9999):04d}",
                    f"+41 44 {rng.randint(100, 999)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
                    f"(0{rng.randint(10, 99)}) {rng.randint(1000, 9999)}-{rng.randint(0, 9999)}",
                ]
            )
        if name == "address1_city":
            return rng.choice(_CITIES)
        if name == "jobtitle":
            return rng.choice(_JOB_TITLES)
        if hazard:
            return rng.choice(_HAZARD_NAMES)
        return f"{rng.choice(_COMPANIES)} {ordinal}"

    # -- mutation API ----------------------------------------------------------------------------

    def _coerce(self, table: EntityTable, key: str, value: Any) -> tuple[str, Any]:
        """Map a caller's column name/value onto the stored row key and wire value."""
        attribute = table.spec.attribute(key)
        if attribute is None or attribute.is_virtual:
            raise KeyError(f"{table.spec.logical_name} has no column {key!r}")
        column = attribute.column
        if value is None:
            return column, None
        category = CATEGORY_BY_TYPE.get(attribute.value_type)
        if category == "date":
            return column, _date_text(value)
        if attribute.attribute_type == "MultiSelectPicklist" and not isinstance(value, str):
            return column, multi_select_value(value)
        if category == "datetime":
            if isinstance(value, datetime):
                stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
            else:
                stamp = parse_datetime(str(value))
            return column, format_datetime(stamp)
        if category == "guid":
            text = str(value).lower()
            if not is_guid(text):
                raise ValueError(f"{key}: {value!r} is not a GUID")
            return column, text
        return column, value

    def _apply_values(
        self, table: EntityTable, pk: str, row: dict[str, Any], values: Mapping[str, Any]
    ) -> None:
        for key, value in values.items():
            if key == "@odata.etag":
                continue
            column, wire = self._coerce(table, key, value)
            if column == table.spec.primary_id_attribute and wire != pk:
                raise ValueError("the primary key cannot be changed")
            row[column] = wire
            attribute = table.spec.attribute(column)
            if attribute is not None and attribute.is_lookup and len(attribute.targets) > 1:
                targets = table.lookup_targets.setdefault(pk, {})
                targets.pop(column, None)
                if wire is not None:
                    for target in attribute.targets:
                        target_table = self._by_logical.get(target)
                        if target_table is not None and wire in target_table.rows:
                            targets[column] = target
                            break
            if column in ("modifiedon", "createdon"):
                self._observe_stamp(wire)
        self._refresh_derived(table, row, values)

    def _refresh_derived(self, table: EntityTable, row: dict[str, Any],
                         values: Mapping[str, Any]) -> None:
        """Recompute what Dataverse computes (a base-currency value, a rate, an image's URL)
        after a write, unless the write set it itself."""
        spec = table.spec
        derived = self._derived_columns(spec)
        if not derived:
            return
        given = {a.column for a in map(spec.attribute, values) if a is not None}
        for attribute in spec.attributes:
            if attribute.logical_name in derived and attribute.column not in given:
                row[attribute.column] = self._derived(spec, attribute, row)

    def create(self, entity_set: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Insert a row (generated like seed rows, overridden by values); returns it."""
        values = dict(values or {})
        with self.lock:
            table = self._tables[entity_set]
            spec = table.spec
            pk_value = values.pop(spec.primary_id_attribute, None)
            pk = str(pk_value).lower() if pk_value else _random_guid(self._mutation_rng)
            if not is_guid(pk):
                raise ValueError(f"{pk_value!r} is not a GUID")
            if pk in table.rows:
                raise ValueError(f"{spec.logical_name} {pk} already exists")
            if spec.is_intersect:
                row = self._build_intersect_row(table, pk, values)
            else:
                row = self._build_row(
                    table, self._mutation_rng, pk, len(table.rows), stamp=self.now()
                )
                self._apply_values(table, pk, row, values)
            table.rows[pk] = row
            table.add_key(pk)
            table.record_change(self._version, pk, "upsert")
            return dict(row)

    def _build_intersect_row(
        self, table: EntityTable, pk: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        left_attr, right_attr = table.spec.attributes[1], table.spec.attributes[2]
        rng = self._mutation_rng
        left = values.get(left_attr.column)
        right = values.get(right_attr.column)
        for _ in range(1000):
            a = str(left).lower() if left else self._random_member(left_attr, rng)
            b = str(right).lower() if right else self._random_member(right_attr, rng)
            if (a, b) not in table.pairs:
                break
            if left and right:
                raise ValueError(f"{table.spec.logical_name} already links {a} and {b}")
        else:
            raise ValueError(f"no unused pair left in {table.spec.logical_name}")
        if not (is_guid(a) and is_guid(b)):
            raise ValueError("intersect columns must be GUIDs")
        table.pairs.add((a, b))
        version = self._next_version()
        return {
            "@odata.etag": f'W/"{version}"',
            table.spec.primary_id_attribute: pk,
            left_attr.column: a,
            right_attr.column: b,
        }

    def _random_member(self, attribute: SimAttribute, rng: random.Random) -> str:
        for target in attribute.targets:
            table = self._by_logical.get(target)
            if table is not None and table.order_keys:
                return table.key_to_pk[rng.choice(table.order_keys)]
        return _random_guid(rng)

    def update(self, entity_set: str, pk: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change columns of a row; stamps modifiedon and a new etag. Returns the new row."""
        with self.lock:
            table = self._tables[entity_set]
            pk = pk.lower()
            old = table.rows.get(pk)
            if old is None:
                raise KeyError(f"{table.spec.logical_name} With Id = {pk} Does Not Exist")
            row = dict(old)  # copy-on-write: a page being serialised keeps the old dict
            if table.spec.has_modifiedon and "modifiedon" not in changes:
                row["modifiedon"] = format_datetime(self.now())
            self._apply_values(table, pk, row, changes)
            if table.spec.is_intersect:
                table.pairs.discard(self._pair_of(table, old))
                table.pairs.add(self._pair_of(table, row))
            version = self._next_version()
            row["@odata.etag"] = f'W/"{version}"'
            if "versionnumber" in row:
                row["versionnumber"] = version
            table.rows[pk] = row
            table.record_change(version, pk, "upsert")
            return dict(row)

    @staticmethod
    def _pair_of(table: EntityTable, row: Mapping[str, Any]) -> tuple[str, str]:
        attributes = table.spec.attributes
        return (row[attributes[1].column], row[attributes[2].column])

    def delete(self, entity_set: str, pk: str) -> None:
        """Remove a row; change tracking will report it as deleted."""
        with self.lock:
            table = self._tables[entity_set]
            pk = pk.lower()
            row = table.rows.pop(pk, None)
            if row is None:
                raise KeyError(f"{table.spec.logical_name} With Id = {pk} Does Not Exist")
            table.remove_key(pk)
            if table.spec.is_intersect:
                table.pairs.discard(self._pair_of(table, row))
            table.lookup_targets.pop(pk, None)
            table.record_change(self._next_version(), pk, "delete")
            if not table.spec.is_intersect:
                self._disassociate(table.spec.logical_name, pk)

    def _disassociate(self, logical_name: str, pk: str) -> None:
        """Deleting a record removes its many-to-many associations, as Dataverse does: the
        intersect rows that name it go too (each a delete of its own)."""
        for other in self._tables.values():
            if not other.spec.is_intersect:
                continue
            columns = [a.column for a in other.spec.attributes[1:3]
                       if logical_name in a.targets]
            if not columns:
                continue
            doomed = [key for key, row in other.rows.items()
                      if any(str(row.get(c) or "").lower() == pk for c in columns)]
            for key in doomed:
                row = other.rows.pop(key)
                other.remove_key(key)
                other.pairs.discard(self._pair_of(other, row))
                other.lookup_targets.pop(key, None)
                other.record_change(self._next_version(), key, "delete")

    # -- schema changes --------------------------------------------------------------------------
    # A customizer adds, removes or retypes a column: metadata (EntityDefinitions, $metadata)
    # and every row change together. As in Dataverse, rows are not stamped: no new modifiedon
    # and no change-tracking entry, so an incremental client sees the new shape on the rows
    # that change afterwards (and on every row of a full read).

    def add_column(
        self,
        entity_set: str,
        attribute: SimAttribute,
        default: Any | Callable[[dict[str, Any]], Any] = None,
    ) -> None:
        """Add a column; existing rows get `default` (or `default(row)` if callable), rows
        created later get generated values like seeded ones."""
        with self.lock:
            table = self._tables[entity_set]
            spec = table.spec
            if not attribute.is_virtual and attribute.value_type not in CATEGORY_BY_TYPE:
                raise ValueError(f"unknown AttributeType {attribute.attribute_type!r}")
            if any(a.logical_name == attribute.logical_name for a in spec.attributes) or (
                not attribute.is_virtual and attribute.column in spec.columns
            ):
                raise ValueError(
                    f"{spec.logical_name} already has a column {attribute.logical_name!r}"
                )
            spec.attributes = [*spec.attributes, attribute]
            self._schema_changed(table)
            if attribute.is_virtual:
                return
            for pk, row in list(table.rows.items()):
                value = default(row) if callable(default) else default
                new_row = dict(row)  # copy-on-write, as for updates
                new_row[attribute.column] = self._coerce(table, attribute.column, value)[1]
                table.rows[pk] = new_row

    def remove_column(self, entity_set: str, name: str) -> None:
        """Delete a column (by logical name or row key) from metadata and every row; its
        Virtual `<name>name` companion goes with it."""
        with self.lock:
            table = self._tables[entity_set]
            spec = table.spec
            attribute = spec.attribute(name)
            if attribute is None:
                raise KeyError(f"{spec.logical_name} has no column {name!r}")
            if attribute.logical_name == spec.primary_id_attribute:
                raise ValueError("the primary key cannot be removed")
            if spec.is_intersect and attribute in spec.attributes[1:3]:
                raise ValueError("the columns an intersect table links cannot be removed")
            spec.attributes = [
                a for a in spec.attributes
                if a is not attribute and a.attribute_of != attribute.logical_name
            ]
            self._schema_changed(table)
            if attribute.is_virtual:
                return
            for pk, row in list(table.rows.items()):
                table.rows[pk] = {k: v for k, v in row.items() if k != attribute.column}
                table.lookup_targets.get(pk, {}).pop(attribute.column, None)

    def change_column_type(
        self,
        entity_set: str,
        name: str,
        attribute_type: str,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        """Give a column another AttributeType; each non-null value becomes `convert(value)`
        (default: str / int / float / bool for the new kind). Lookup-ness cannot change, since
        that renames the row key."""
        with self.lock:
            table = self._tables[entity_set]
            spec = table.spec
            attribute = spec.attribute(name)
            if attribute is None or attribute.is_virtual:
                raise KeyError(f"{spec.logical_name} has no column {name!r}")
            if attribute_type not in CATEGORY_BY_TYPE or attribute_type == "Date":
                raise ValueError(f"unknown AttributeType {attribute_type!r}")
            changed = replace(attribute, attribute_type=attribute_type)
            if changed.is_lookup != attribute.is_lookup:
                raise ValueError("a column cannot become or stop being a lookup")
            if attribute.logical_name == spec.primary_id_attribute:
                raise ValueError("the primary key's type cannot be changed")
            spec.attributes = [changed if a is attribute else a for a in spec.attributes]
            self._schema_changed(table)
            category = CATEGORY_BY_TYPE[changed.value_type]
            convert = convert or _DEFAULT_CONVERSIONS.get(category, str)
            for pk, row in list(table.rows.items()):
                value = row.get(changed.column)
                new_row = dict(row)
                new_row[changed.column] = self._coerce(
                    table, changed.column, None if value is None else convert(value)
                )[1]
                table.rows[pk] = new_row

    @staticmethod
    def _schema_changed(table: EntityTable) -> None:
        table.column_types = table.spec.column_types
        table.data_version += 1
        table.cache.clear()  # cached orders hold the old row dicts

    # -- truth -----------------------------------------------------------------------------------

    def records(self, entity_set: str) -> list[dict[str, Any]]:
        """Every current row as the API returns it, in the server's primary-key order."""
        with self.lock:
            table = self._tables[entity_set]
            return [dict(table.rows[table.key_to_pk[k]]) for k in table.order_keys]

    def record(self, entity_set: str, pk: str) -> dict[str, Any] | None:
        """One current row, or None."""
        with self.lock:
            row = self._tables[entity_set].rows.get(pk.lower())
            return dict(row) if row is not None else None

    def lookup_target(self, entity_set: str, pk: str, column: str,
                      attribute: SimAttribute | None = None) -> str | None:
        """Logical name of the table a lookup value points at (for annotations). `attribute`:
        the column's, when the caller has it (annotating a page: not looked up per row)."""
        table = self._tables[entity_set]
        attribute = attribute or table.spec.attribute(column)
        if attribute is None or not attribute.is_lookup:
            return None
        found = table.lookup_targets.get(pk, {}).get(column)
        if found is not None:
            return found
        if table.lazy is not None and pk not in table.rows.overrides:  # type: ignore[attr-defined]
            found = table.lazy.lookup_target(pk, column)
            if found is not None:
                return found
        return attribute.targets[0] if attribute.targets else None

    def primary_name(self, logical_name: str, guid: str) -> str | None:
        """The primary name of the record a lookup points at (its FormattedValue), or None."""
        if logical_name == "transactioncurrency" and logical_name not in self._by_logical:
            currency = _CURRENCY_BY_ID.get(guid)
            return currency.name if currency is not None else None
        table = self._by_logical.get(logical_name)
        if table is None or table.spec.primary_name_attribute is None:
            return None
        row = table.rows.get(guid)
        return None if row is None else row.get(table.spec.primary_name_attribute)

    @staticmethod
    def currency(guid: str | None) -> SimCurrency:
        """The currency a transactioncurrencyid names (the base currency if none)."""
        return _CURRENCY_BY_ID.get(guid or "", BASE_CURRENCY)

    # -- choices ---------------------------------------------------------------------------------
    # Option sets are metadata: changing a label or an option touches no row (no new version,
    # no change-tracking entry), but what is served afterwards (labels in metadata, formatted
    # values) uses the change. A global set's change shows on every attribute using it.

    def _option_set_for(self, spec: SimEntity, attribute: SimAttribute) -> SimOptionSet:
        name = attribute.option_set or local_set_name(spec.logical_name, attribute.logical_name)
        found = self._option_sets.get(name)
        if found is None:
            found = new_option_set(spec.logical_name, attribute.logical_name,
                                   attribute.attribute_type, attribute.option_set)
            self._option_sets[name] = found
        return found

    def option_set_of(self, spec: SimEntity, attribute: SimAttribute) -> SimOptionSet:
        """The option set a choice column uses (for the HTTP layer)."""
        with self.lock:
            return self._option_set_for(spec, attribute)

    def option_set(self, entity_set: str, attribute: str) -> SimOptionSet:
        """The option set of a choice column (KeyError if there is no such column, ValueError
        if it is not a choice)."""
        with self.lock:
            spec = self._tables[entity_set].spec
            found = spec.attribute(attribute)
            if found is None or found.is_virtual:
                raise KeyError(f"{spec.logical_name} has no column {attribute!r}")
            if not found.is_choice:
                raise ValueError(f"{spec.logical_name}.{attribute} is not a choice column")
            return self._option_set_for(spec, found)

    def formatted_choice(self, spec: SimEntity, attribute: SimAttribute, value: Any) -> str:
        """The FormattedValue of a choice value in the calling user's language."""
        with self.lock:
            return formatted_choice(self._option_set_for(spec, attribute),
                                    attribute.attribute_type, value, self.user_language_code)

    def set_option_label(self, entity_set: str, attribute: str, value: int, label: str,
                         language_code: int = BASE_LANGUAGE) -> None:
        """Relabel an option in one language (adding the language's label if it had none)."""
        with self.lock:
            option = self.option_set(entity_set, attribute).option(int(value))
            if option is None:
                raise KeyError(f"{entity_set}.{attribute} has no option {value}")
            option.labels[int(language_code)] = label

    def add_option(self, entity_set: str, attribute: str, value: int, label: str, *,
                   language_code: int = BASE_LANGUAGE, state: int | None = None,
                   default_status: int | None = None) -> None:
        """Add an option at the end of the set; a Status option needs the `state` it belongs
        to, a State option may name its `default_status`. Boolean sets have exactly two."""
        with self.lock:
            option_set = self.option_set(entity_set, attribute)
            if option_set.option_set_type == "Boolean":
                raise ValueError("a Boolean option set has exactly a true and a false option")
            if option_set.option(int(value)) is not None:
                raise ValueError(f"{entity_set}.{attribute} already has an option {value}")
            if option_set.option_set_type == "Status" and state is None:
                raise ValueError("a Status option needs the state it belongs to")
            option_set.options.append(SimOption(
                int(value), {int(language_code): label}, state=state,
                default_status=default_status,
                invariant_name=label if option_set.option_set_type == "State" else None,
            ))

    def remove_option(self, entity_set: str, attribute: str, value: int) -> None:
        """Delete an option. Rows holding its value keep it; their FormattedValue becomes the
        number, since no label is left for it."""
        with self.lock:
            option_set = self.option_set(entity_set, attribute)
            if option_set.option_set_type == "Boolean":
                raise ValueError("a Boolean option set has exactly a true and a false option")
            option = option_set.option(int(value))
            if option is None:
                raise KeyError(f"{entity_set}.{attribute} has no option {value}")
            option_set.options.remove(option)
