"""The search's Optuna study: created in or continued from a journal file, whose context must match."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:  # search.py imports this module
    from pipeline.edit.search import SearchConfig

STUDY_NAME = "abliterate"


@contextmanager
def quiet_optuna() -> Iterator[None]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def open_study(path: Path, cfg: SearchConfig, context: dict[str, Any] | None = None) -> Any:
    """Create or continue the study in the journal file ``path``; ``context`` must match a resumed one."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(path).expanduser()
    try:
        _check_journal(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(path)))
        existing = optuna.study.get_all_study_names(storage)
        done = len(storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME))) if STUDY_NAME in existing else 0
        sampler = optuna.samplers.TPESampler(seed=cfg.search_seed + done, multivariate=True, group=True,
                                             n_startup_trials=max(4, min(10, (done + cfg.trials) // 4)))
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=STUDY_NAME, load_if_exists=True,
                                    directions=["minimize", "minimize"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError, OSError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"cannot read study file '{path}' ({type(exc).__name__}: {reason}): give another --study "
                        "(or remove that file if it is a broken study)") from exc
    context, old = json.loads(json.dumps(context or {}, default=str)), study.user_attrs.get("context")
    changed = sorted(k for k in set(old or {}) | set(context) if old is not None and old.get(k) != context.get(k))
    if changed:
        raise UserError(f"study file '{path}' was made with other {', '.join(changed)}: its scores do not compare; "
                        "choose another --study")
    if old is None:
        study.set_user_attr("context", context)
    return study


def _check_journal(path: Path) -> None:
    """ValueError unless every line of an existing file is an Optuna journal record (a JSON operation)."""
    for number, line in enumerate(path.read_bytes().splitlines() if path.is_file() else [], 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "op_code" not in record:
            raise ValueError(f"line {number} is not an Optuna journal record")
