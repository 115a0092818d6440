"""docker-compose.yml can't run here (no engine): check it parses and every command is ours."""

from pathlib import Path

import typer.main
import yaml

from cli.main import cli

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def our_services() -> dict:
    return {n: s for n, s in compose()["services"].items() if n != "redis"}


def test_every_service_command_is_a_real_tokenpool_command_with_valid_options():
    group = typer.main.get_command(cli)
    assert hasattr(group, "commands")
    for name, service in our_services().items():
        command, *args = service["command"]
        assert command in group.commands, name
        ctx = group.commands[command].make_context(command, list(args))  # raises on bad options
        assert ctx.params, name


def test_gpu_workers_reserve_one_host_gpu_and_pin_to_it_inside_the_container():
    for name, service in our_services().items():
        if not name.startswith("worker-"):
            continue
        args = service["command"]
        gpu = args[args.index("--gpu") + 1]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if gpu == "cpu":
            assert "cpu" in service["profiles"] and not devices, name
        else:
            (device,) = devices["devices"]
            assert len(device["device_ids"]) == 1 and gpu == "0", name


def test_redis_keeps_an_aof_and_a_password_and_every_service_has_a_healthcheck():
    services = compose()["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert "--requirepass" in services["redis"]["command"]
    assert all("healthcheck" in s for s in services.values())
    assert "TOKENPOOL_FLOWER_PASSWORD" in services["flower"]["environment"]
