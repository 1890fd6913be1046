"""The configuration reference (docs/configuration.md), generated from the pydantic models in
config.py: every environment variable and every field of the entities file, with its type,
default, allowed range or choices and description. Generated, so it cannot drift from what
validation enforces; `dataverse_assets_tests/ops/test_docs.py` compares the committed page
with this output.

Regenerate: `python -m dataverse_assets.ops.config_reference > docs/configuration.md`
"""

from __future__ import annotations

import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from dataverse_assets.config import (
    _ENV_FIELDS,
    PROJECT_ROOT,
    ArchiveConfig,
    EntitiesConfig,
    EntityConfig,
    GroupConfig,
    LabelsConfig,
    LinkSource,
    MaintenanceConfig,
    Settings,
)
from dataverse_assets.sync.prestage import STAGE_WHILE_FETCHING_ENV
from dataverse_assets.sync.stage import STAGING_WORKERS_ENV

REGENERATE = "python -m dataverse_assets.ops.config_reference > docs/configuration.md"

# Variables read outside Settings, with what the generated rows would say.
EXTRA_VARIABLES = (
    (STAGE_WHILE_FETCHING_ENV, "true", "true or false",
     "A fetch stages each page on a thread as it archives it, so staging/E only takes the "
     "rows (asset metadata `staged_while_fetching`); staging/E stages the archive itself when "
     "the fetch's rows are not exactly its own (a schema that evolved, a filtered entity, a "
     "targeted refresh). false: always from the archive. Read by `sync/prestage.py`."),
    (STAGING_WORKERS_ENV, "0", "0 or more",
     "Processes that parse a change set of 20 or more page files when it is staged from the "
     "archive (a rebuild; staging/E when nothing was staged while fetching) (0 or 1: none, "
     "the step's own process does it). 2 cut a 1M-row full sync by ~15-20% and make a "
     "rebuild 25-40% faster on 2 cores, for ~115 MB each (see [Performance](performance.md)). "
     "Read by `sync/stage.py` when a change set is staged."),
    ("DATAVERSE_ALERT_WEBHOOK_URL", "unset", "an http(s) URL",
     "Alerts (failed runs, new dead letters, late groups) are POSTed here as `{\"text\": ...}` "
     "(a Slack-compatible incoming webhook). Unset, with no SMTP host: no alert sensor exists. "
     "Read by `defs/alerts.py`."),
    ("DATAVERSE_ALERT_SMTP_HOST", "unset", "a host name",
     "Alerts by e-mail through this SMTP server (with DATAVERSE_ALERT_TO)."),
    ("DATAVERSE_ALERT_SMTP_PORT", "25", "1 to 65535", "The SMTP server's port."),
    ("DATAVERSE_ALERT_FROM", "dataverse-assets@localhost", "an address",
     "The alert e-mails' sender."),
    ("DATAVERSE_ALERT_TO", "unset", "comma-separated addresses",
     "Who receives alert e-mails."),
    ("DATAVERSE_ALERT_UI_URL", "unset", "a URL",
     "The Dagster UI's address, for a link to the run in each alert."),
)

# The entities file's sections, in the order a reader meets them: (heading, model, path).
SECTIONS = (
    ("Top level", EntitiesConfig, ""),
    ("`groups.<name>`: a cadence group", GroupConfig, "groups.<name>."),
    ("`entities[]`: an entity", EntityConfig, "entities[]."),
    ("`entities[].linked_from[]`: where a filtered entity's ids come from", LinkSource,
     "entities[].linked_from[]."),
    ("`labels` and `entities[].labels`", LabelsConfig, "labels."),
    ("`archive`", ArchiveConfig, "archive."),
    ("`maintenance`", MaintenanceConfig, "maintenance."),
)

INTRO = """\
# Configuration reference

<!-- Generated from the pydantic models in dataverse_assets/config.py; do not edit by hand.
     Regenerate: {regenerate} -->

Two places configure the mirror: **environment variables** (or a `.env` file at the project
root, loaded with python-dotenv; a variable already set in the environment wins over `.env`),
for endpoints, secrets and paths; and the **entities file** (`entities_config.json`, or the
file `DATAVERSE_ENTITIES_CONFIG` names), for what to mirror and how often. Both are validated
before anything runs. `.env.example` at the project root lists every variable with a comment.

Every number has a range, and a value outside it, NaN or Infinity, `true`/`false` given for a
number, a fraction for a whole number (`5000.0`, `"5000"`) or a JSON key given twice is refused
with one line naming the entity and the field, e.g.
`entities_config.json: entity 'accounts' (entities[5]), field 'incremental': Input should be
'auto', 'modifiedon', 'change_tracking' or 'full'`, or `entity 'x' (entities[2]): key
'page_size' is given twice`. An environment variable out of range is named the same way
(`DATAVERSE_MAX_RESPONSE_MB: ...`), never with a secret's value. The ranges are what a real
user could need and nothing downstream can overflow on (timedelta, SQLite integers, sleeps).
"""

ENV_NOTES = """\
The client secret reaches Dagster only through `EnvVar`, so the UI never displays it. It must
be at least 8 characters (a shorter one is refused, naming the variable and never the value:
Entra issues ~40). With `DATAVERSE_SOURCE=live`, `DATAVERSE_URL`, `DATAVERSE_CLIENT_ID` and
`DATAVERSE_CLIENT_SECRET` are required, and `DATAVERSE_URL` and `DATAVERSE_AUTHORITY` must be
`https://`; `http://` is taken only to this machine (`localhost`, `127.0.0.0/8`, `::1`) unless
`DATAVERSE_ALLOW_INSECURE_HTTP=true`. `DATAVERSE_SOURCE=simulator` with `DATAVERSE_URL` set
talks to a simulator served on that URL (`dataverse-assets simulator --port 8765`). An empty
variable counts as unset. Relative paths are relative to the working directory; the defaults
are in the project folder.
"""

FILE_EXAMPLE = """\
```json
{
  "groups": {"hourly": {"cron": "0 * * * *"}, "daily": {"cron": "30 2 * * *"}},
  "entities": [
    {"name": "vin_candidates", "description": "...", "group": "hourly"},
    {"name": "vin_vin_candidate_accountset", "group": "hourly", "incremental": "full"},
    {"name": "accounts", "group": "hourly", "filtered": true,
     "linked_from": [{"entity": "vin_vin_candidate_accountset", "column": "accountid"}]}
  ]
}
```

The file is validated before anything runs, with the rules below and these across fields: a
filtered entity needs `linked_from` and takes no `filter`; its linking entities are configured,
in the same group and not filtered themselves; `filter` does not go with `incremental:
change_tracking`; no two entities share a name in any letter case (one SQLite table); a cron
must match at least one date (`0 0 31 4 *` does not); entity names that SQLite's or the
mirror's own tables, views and indexes use (`sqlite_...`, `...__history`, `...__readable`) are
refused. Unknown fields are refused ("check the spelling"). See [How a sync
works](how-a-sync-works.md) for what the modes do and [Operations](operations.md) for
compaction, retention and priorities.
"""

# Settings fields whose model default is not what a user gets when the variable is unset.
_UNSET_MEANS = {"source": "`live` with a URL, else `simulator`",
                "tenant_id": "discovered", "url": "the embedded simulator"}


def _type_name(annotation: Any) -> str:
    """A field's JSON type in words."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        inner = _type_name(args[0]) if len(args) == 1 else " or ".join(map(_type_name, args))
        return f"{inner} or null"
    if origin is Literal:
        return "text"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"object of {_type_name(args[1])}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "object"
        if issubclass(annotation, bool):
            return "true/false"
        if issubclass(annotation, int):
            return "integer"
        if issubclass(annotation, float):
            return "number"
        if issubclass(annotation, str | SecretStr | Path):
            return "text"
    return str(annotation)


def _choices(annotation: Any) -> list[str]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(annotation) for c in _choices(a)]
    if origin is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(m.value) for m in annotation]
    return []


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) or value != int(value) else f"{int(value):,}"


def allowed(info: FieldInfo) -> str:
    """The range or choices validation enforces, from the field's constraints."""
    choices = _choices(info.annotation)
    if choices:
        return ", ".join(f"`{c}`" for c in choices)
    bounds = {type(m): m for m in info.metadata}
    parts = []
    if Ge in bounds or Le in bounds:
        low = _number(bounds[Ge].ge) if Ge in bounds else "-inf"
        high = _number(bounds[Le].le) if Le in bounds else "inf"
        parts.append(f"{low} - {high}")
    if MinLen in bounds or MaxLen in bounds:
        low = bounds[MinLen].min_length if MinLen in bounds else 0
        unit = "characters" if _type_name(info.annotation).startswith("text") else "items"
        parts.append(f"{low} - {bounds[MaxLen].max_length:,} {unit}" if MaxLen in bounds
                     else f"at least {low}")
    if parts and "or null" in _type_name(info.annotation):
        parts.append("or null")
    return " ".join(parts)


def default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        return "`[]`" if value == [] else "(the section's defaults)"
    if info.default is PydanticUndefined:
        return "required"
    value = info.default
    if value is None:
        return "null"
    if isinstance(value, Path):
        try:
            value = value.relative_to(PROJECT_ROOT)
        except ValueError:
            pass
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return _number(value)
    return f"`{value}`" if str(value) else '`""`'


def _description(info: FieldInfo) -> str:
    text = (info.description or "").replace("|", "\\|").replace("\n", " ")
    # The range is its own column; ranged() also writes it into the description.
    return text.split(" Range: ")[0]


def environment_table() -> str:
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for variable, name in _ENV_FIELDS.items():
        info = Settings.model_fields[name]
        shown = _UNSET_MEANS.get(name) or default(info)
        if shown == "null":
            shown = "unset"
        rows.append(f"| `{variable}` | {shown} | {allowed(info)} | {_description(info)} |")
    for variable, shown, range_, meaning in EXTRA_VARIABLES:
        rows.append(f"| `{variable}` | {shown} | {range_} | {meaning} |")
    return "\n".join(rows) + "\n"


def model_table(model: type[BaseModel], prefix: str) -> str:
    rows = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        rows.append(f"| `{prefix}{name}` | {_type_name(info.annotation)} | {default(info)} | "
                    f"{allowed(info)} | {_description(info)} |")
    return "\n".join(rows) + "\n"


def environment_variables() -> list[str]:
    """Every variable the reference documents: what load_settings reads, and the others."""
    return [*_ENV_FIELDS, *(extra[0] for extra in EXTRA_VARIABLES)]


def render() -> str:
    """The whole of docs/configuration.md."""
    parts = [INTRO.format(regenerate=REGENERATE),
             "## Environment variables\n", environment_table(), ENV_NOTES,
             "## The entities file\n", FILE_EXAMPLE]
    for heading, model, prefix in SECTIONS:
        doc = " ".join((model.__doc__ or "").split("\n\n")[0].split())
        parts.append(f"### {heading}\n\n{doc}\n\n{model_table(model, prefix)}")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
