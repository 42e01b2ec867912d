"""The service's pydantic models. Each defers building its validator and serializer to its first
use (`defer_build=True`): a function builds only the models its requests use, not all of them
at every cold start (issue 13).
"""

import sys


def build_imported_models() -> list[str]:
    """Build now every model of the modules this process imported (usage_meter.*): before a
    SnapStart snapshot, so that restored environments find them built. The names built."""
    from pydantic import BaseModel

    built = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("usage_meter.") or module is None:
            continue
        for value in list(vars(module).values()):
            if (
                isinstance(value, type)
                and issubclass(value, BaseModel)
                and value.__module__ == name
                and not value.__pydantic_complete__
            ):
                value.model_rebuild()
                built.append(f"{name}.{value.__name__}")
    return built
