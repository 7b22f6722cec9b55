"""The config schema: one dataclass per config group, checked against the composed config.

Each field's type says what a value may be (``Literal`` for a fixed set of names, ``X | None``
for an optional one, a nested dataclass for a sub-group, ``dict[str, Spec]`` for named entries
such as ``data.mix``); its metadata adds a range (``ge``, ``gt``, ``le``, ``lt``), choices known
only at run time (the scorer and reader registries), or a plain-name rule for values used as
path components. :func:`check_group` walks the resolved config against these classes and raises
:class:`ConfigError` at the first bad value, naming the key and the valid choices or range.
:mod:`lobass.schema.secrets` refuses values that look like API keys.

Keys the schema does not know are refused, with the closest known key (``train.learnig_rate``:
did you mean ``train.learning_rate``?): a misspelt key in an experiment file or a ``+key=``
override would otherwise be saved with the run and ignored. A new option is a new field here.
Free-form mappings (``model.arch``, ``train.fsdp_config``, ...) are typed ``dict[str, Any]`` and
passed on as they are. ``lobass.config.validate`` runs all of it, then the checks across fields.
"""

from lobass.schema.secrets import (
    check_key_env,
    find_secret,
    plain_http_host,
    refuse_secrets,
)
from lobass.schema.specs import JUDGE_SPECS, LOGGER_SPECS, RootSpec
from lobass.schema.walk import (
    ConfigError,
    check_group,
    check_known_keys,
    check_plain_name,
    check_value,
    knob,
)

__all__ = ["JUDGE_SPECS", "LOGGER_SPECS", "ConfigError", "RootSpec", "check_group",
           "check_key_env", "check_known_keys", "check_plain_name", "check_value", "find_secret",
           "knob", "plain_http_host", "refuse_secrets"]
