"""The functions' botocore clients (usage_meter.aws): the same clients as botocore's default
session makes, without its survey of every AWS service's data directory at a cold start."""

import os
import shutil
from pathlib import Path

import botocore
import botocore.session
import pytest
from botocore.exceptions import DataNotFoundError

from usage_meter import aws

DATA = Path(botocore.__file__).parent / "data"


@pytest.fixture(autouse=True)
def region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories of botocore's data listed, relative to it."""
    seen: list[str] = []
    listdir = os.listdir

    def counting(path: str = ".") -> list[str]:
        if str(path).startswith(str(DATA)):
            seen.append(os.path.relpath(path, DATA))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counting)
    return seen


def test_botocores_own_session_lists_every_services_directory(listed):
    # The cost the functions avoid, seen by the same count as test_cold_start's probe
    botocore.session.get_session().create_client("dynamodb")
    assert len(set(listed)) > 400


def test_a_client_lists_only_its_own_services_directory(listed):
    db = aws.client("dynamodb")
    assert set(listed) == {"dynamodb"}
    assert db.meta.service_model.service_name == "dynamodb"
    assert db.meta.region_name == "eu-west-1"


def test_a_client_is_configured_as_given_and_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9")
    config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 6})
    db = aws.client("dynamodb", config)
    assert db.meta.endpoint_url == "http://127.0.0.1:9"
    # botocore counts max_attempts as retries: the first call and 6 more
    assert db.meta.config.retries == {"mode": "standard", "total_max_attempts": 7}


def test_models_on_aws_data_path_are_still_found(monkeypatch, tmp_path):
    # AWS_DATA_PATH adds model directories, searched before botocore's own: a service only
    # there is found, as with botocore's default loader
    shutil.copytree(DATA / "dynamodb", tmp_path / "usagemeterdb")
    monkeypatch.setenv("AWS_DATA_PATH", f"{tmp_path}{os.pathsep}{tmp_path / 'none'}")
    db = aws.client("usagemeterdb")
    assert db.meta.service_model.service_name == "usagemeterdb"
    assert hasattr(db, "transact_write_items")


def test_a_service_without_a_model_is_refused():
    with pytest.raises(DataNotFoundError):
        aws.client("no-such-service")


def test_a_session_botocore_hands_out_is_left_as_it_was(monkeypatch):
    # A caller (moto, a test, an embedding app) may make get_session() hand out one shared
    # session: the client's one-service loader must not become that session's loader, or every
    # other service's model would be unknown to it (moto then knew no region of DynamoDB)
    shared = botocore.session.get_session()
    loader = shared.get_component("data_loader")
    monkeypatch.setattr(botocore.session, "get_session", lambda *_: shared)
    aws.client("secretsmanager")
    assert shared.get_component("data_loader") is loader
    assert shared.get_service_data("dynamodb")["metadata"]["endpointPrefix"] == "dynamodb"
