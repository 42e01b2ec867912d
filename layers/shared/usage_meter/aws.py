"""botocore clients, made for a cold start: botocore without boto3 (a third less import time),
and without botocore's survey of every AWS service it knows."""

from typing import Any

import botocore.session
from botocore.config import Config
from botocore.loaders import Loader, create_loader


class _OneServiceLoader(Loader):
    """botocore's data loader for a session that makes clients of one service.

    Before it loads a service's model, botocore's loader lists the data directory of every
    service it ships (over 400: some 900 directory reads and 2,800 stats, about 25 ms of a cold
    start; issue 13), only to check that the name asked for is among them. This session asks
    for one name, its own; a model missing from its directory still fails to load."""

    def __init__(self, service: str, search_paths: list[str]) -> None:
        super().__init__(extra_search_paths=search_paths, include_default_search_paths=False)
        self._service = service

    def list_available_services(self, type_name: str) -> list[str]:
        return [self._service]


def client(service: str, config: Config | None = None) -> Any:
    """A client of `service` from a session of its own, configured like botocore's default one
    (environment, AWS_DATA_PATH, endpoint from AWS_ENDPOINT_URL_<SERVICE>).

    The session is made here, not taken from botocore.session.get_session(), which a caller may
    have made hand out a shared one: its loader is this service's alone."""
    session = botocore.session.Session()
    # The search paths of the loader botocore would make (AWS_DATA_PATH first, then its own)
    default = create_loader(session.get_config_variable("data_path"))
    session.register_component("data_loader", _OneServiceLoader(service, default.search_paths))
    return session.create_client(service, config=config)
