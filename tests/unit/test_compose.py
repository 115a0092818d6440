"""docker-compose.yml can't run here (no engine): check it parses, that every command and
healthcheck is a real command of ours, that GPU pinning is consistent, and that the images it
builds copy files that exist."""

from pathlib import Path
from typing import Any

import typer.main
import yaml

from cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def our_services() -> dict:
    return {n: s for n, s in compose()["services"].items() if n != "redis"}


def parses_as_our_cli(args: list[str]) -> Any:
    """Parse (not run) `tokenpool ARGS`: raises on an unknown command or a bad option."""
    group = typer.main.get_command(cli)
    assert hasattr(group, "commands")
    command, *rest = args
    assert command in group.commands, f"tokenpool has no command {command!r}"
    return group.commands[command].make_context(command, list(rest))


def test_every_service_command_is_a_real_tokenpool_command_with_valid_options():
    for name, service in our_services().items():
        assert parses_as_our_cli(service["command"]).params, name


def test_every_service_has_a_healthcheck_and_ours_are_real_commands():
    for name, service in compose()["services"].items():
        test = service["healthcheck"]["test"]
        if name == "redis":
            assert "ping" in test[1]
            continue
        assert test[:2] == ["CMD", "tokenpool"], name
        parses_as_our_cli(test[2:])
        assert test[3] == {"api": "api", "flower": "flower", "beat": "beat"}.get(name, "worker")


def test_gpu_workers_reserve_one_host_gpu_use_the_cuda_image_and_pin_to_it_inside():
    host_gpus = set()
    for name, service in our_services().items():
        if not name.startswith("worker-"):
            continue
        args = service["command"]
        gpu = args[args.index("--gpu") + 1]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if gpu == "cpu":
            assert "cpu" in service["profiles"] and not devices, name
            assert service["build"]["dockerfile"] == "Dockerfile", name
        else:
            (device,) = devices["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
            assert len(device["device_ids"]) == 1 and gpu == "0", name
            assert service["build"]["dockerfile"] == "Dockerfile.cuda", name
            host_gpus |= set(device["device_ids"])
    assert host_gpus == {"0", "1"}


def test_redis_keeps_an_aof_and_a_password_and_flower_and_beat_are_there():
    services = compose()["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert "--requirepass" in services["redis"]["command"]
    assert "TOKENPOOL_FLOWER_PASSWORD" in services["flower"]["environment"]
    assert services["beat"]["command"] == ["beat"]
    assert all("./models:/models" in s["volumes"] for s in our_services().values())
    assert all(port.startswith("127.0.0.1:") for s in services.values()
               for port in s.get("ports", []))
    # the API binds 0.0.0.0 inside its container: without keys it must be told why that is ok
    assert services["api"]["environment"]["TOKENPOOL_BEHIND_TRUSTED_PROXY"] == "1"
    assert services["api"]["environment"]["REDIS_URL"].startswith("redis://:")


def test_the_dockerfiles_copy_what_exists_and_run_our_cli():
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        lines = (ROOT / dockerfile).read_text().splitlines()
        copies = [line.split()[1:-1] for line in lines
                  if line.startswith("COPY ") and "--from" not in line]
        sources = {src for srcs in copies for src in srcs}
        assert {"pyproject.toml", "api", "broker", "tasks", "workers", "cli"} <= sources
        assert all((ROOT / src).exists() for src in sources), dockerfile
        assert 'ENTRYPOINT ["tokenpool"]' in lines, dockerfile
    assert "download.pytorch.org/whl/cpu" in (ROOT / "Dockerfile").read_text()
    assert "-DGGML_CUDA=on" in (ROOT / "Dockerfile.cuda").read_text()


def test_the_ha_override_gives_redis_a_replica_three_sentinels_and_every_service_sentinel():
    ha = yaml.safe_load((ROOT / "docker-compose.ha.yml").read_text())
    services = ha["services"]
    sentinels = sorted(n for n in services if n.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in sentinels:
        script = " ".join(services[name]["command"])
        assert "sentinel monitor tokenpool redis 6379 2" in script  # a quorum of two
        assert "--sentinel" in script
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:] == ["redis", "6379"]
    assert "--masterauth" in services["redis"]["command"]  # it may become a replica
    for name in our_services():  # every tokenpool service of the base file
        env = services[name]["environment"]
        hosts = yaml.safe_load(env["TOKENPOOL_REDIS_SENTINEL__HOSTS"])
        assert hosts == [f"{s}:26379" for s in sentinels], name
        assert env["TOKENPOOL_REDIS_SENTINEL__MASTER"] == "tokenpool"
        assert env["TOKENPOOL_REDIS_CONFIRM_REPLICAS"] == "1"


def test_the_ha_environment_makes_settings_find_the_master_through_the_sentinels(monkeypatch):
    from broker.connection import parse_sentinel
    from broker.settings import Settings

    ha = yaml.safe_load((ROOT / "docker-compose.ha.yml").read_text())
    for key, value in ha["services"]["api"]["environment"].items():
        monkeypatch.setenv(key, value.replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", "pw")
                           .replace("${SENTINEL_PASSWORD:?set SENTINEL_PASSWORD}", "sp"))
    monkeypatch.setenv("REDIS_URL", "redis://:pw@redis:6379/0")  # the base file's, overridden
    address = parse_sentinel(Settings().redis_address)
    assert address is not None and address.master == "tokenpool"
    assert address.sentinels == [(f"sentinel-{i}", 26379) for i in (1, 2, 3)]
    assert (address.password, address.sentinel_password) == ("pw", "sp")
