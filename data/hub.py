"""Recognising an unreachable Hugging Face Hub, and the one message that says what to do instead."""
from __future__ import annotations

from data.config import TRAIN_SHARD_GLOB, VALIDATION_SHARD_GLOB


def is_connection_error(error: BaseException) -> bool:
    """True for the ways `datasets`/`huggingface_hub` report no network or offline mode."""
    from huggingface_hub import errors as hub_errors

    offline_types = (ConnectionError, TimeoutError, hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, offline_types) or "offline" in type(error).__name__.lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def hub_unreachable_message(what: str, remedy: str) -> str:
    return (
        f"the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is "
        f"set), so {what} cannot be loaded: {remedy}, or train on the bundled corpus with data=sample"
    )


def local_shards_remedy() -> str:
    return (
        f"download C4 shards ({TRAIN_SHARD_GLOB} and {VALIDATION_SHARD_GLOB} from the allenai/c4 "
        f"dataset repo) and set data.path to the directory that contains en/"
    )
