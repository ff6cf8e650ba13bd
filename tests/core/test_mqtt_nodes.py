"""Broker URLs naming several nodes (``--broker`` repeated or a comma list): parsing, checks and
the messages for bad input."""

from __future__ import annotations

import pytest

from edgeserve.errors import ConfigError
from edgeserve.mqtt import BrokerSettings, topic_hint


def test_one_url_is_one_node_as_before() -> None:
    settings = BrokerSettings.from_url("mqtt://127.0.0.1:1884")
    assert settings.nodes == (("127.0.0.1", 1884),) and settings.fallbacks == ()
    assert settings.url == "mqtt://127.0.0.1:1884"


def test_a_comma_list_names_the_nodes_in_order() -> None:
    settings = BrokerSettings.from_url(" mqtts://a.example:8884 , mqtts://b.example,"
                                       "mqtts://c.example:9000 ")
    assert settings.nodes == (("a.example", 8884), ("b.example", 8883), ("c.example", 9000))
    assert settings.tls and settings.url == (
        "mqtts://a.example:8884,mqtts://b.example:8883,mqtts://c.example:9000")
    assert settings.node_url(1) == "mqtts://b.example:8883"
    # it round-trips (the fleet passes its settings' url on)
    assert BrokerSettings.from_url(settings.url).nodes == settings.nodes


def test_a_list_of_urls_equals_the_comma_list() -> None:
    assert BrokerSettings.from_urls(["mqtt://a", "mqtt://b:1884"]) == BrokerSettings.from_url(
        "mqtt://a,mqtt://b:1884")


def test_credentials_of_any_node_apply_to_all_and_options_win() -> None:
    settings = BrokerSettings.from_url("mqtt://a,mqtt://dev%401:s3cret@b")
    assert (settings.username, settings.password) == ("dev@1", "s3cret")
    overridden = BrokerSettings.from_url("mqtt://u:p@a,mqtt://b", username="other",
                                         protocol="3.1.1")
    assert (overridden.username, overridden.password, overridden.protocol) == (
        "other", "p", "3.1.1")
    assert overridden.nodes == (("a", 1883), ("b", 1883))


@pytest.mark.parametrize(("url", "message"), [
    ("", "no broker URL given"),
    (" , ", "no broker URL given"),
    ("mqtt://a,mqtts://b", "does not use the scheme of 'mqtt://a'"),
    ("mqtt://a,mqtt://a:1883", "broker a:1883 is given twice"),
    ("mqtt://a,http://b", "broker URL 'http://b' is not valid; expected mqtt://HOST[:PORT]"),
    ("mqtt://a,mqtt://b:99999", "broker URL 'mqtt://b:99999' has an invalid port"),
    ("mqtt://a,mqtt://b/x", "broker URL 'mqtt://b/x' has a path"),
    ("mqtt://u:p@a,mqtt://v:q@b", "carries other credentials than 'mqtt://u:p@a'"),
])
def test_bad_lists_are_refused_naming_the_url_and_the_expected_form(url: str,
                                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("?", r"\?")):
        BrokerSettings.from_url(url)


def test_topics_nats_refuses_get_a_hint() -> None:
    assert "'.'" in topic_hint("edgeserve/v1/f/dev.1/status")
    assert topic_hint("edgeserve/v1/f/dev-1:a/status") == ""


def test_the_broker_option_repeats_or_takes_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--broker`` given twice, a comma list in one, or EDGESERVE_BROKER: the same nodes."""
    import click
    from click.testing import CliRunner

    from edgeserve.fleet.cli_options import broker_options, broker_settings

    seen: list[BrokerSettings] = []

    @click.command()
    @broker_options
    def command(**options: object) -> None:
        seen.append(broker_settings(options))

    runner = CliRunner()
    monkeypatch.delenv("EDGESERVE_BROKER", raising=False)
    for args, env in ((["--broker", "mqtt://a:1", "--broker", "mqtt://b:2"], {}),
                      (["--broker", "mqtt://a:1,mqtt://b:2"], {}),
                      ([], {"EDGESERVE_BROKER": "mqtt://a:1,mqtt://b:2"}),
                      ([], {"EDGESERVE_BROKER": "mqtt://a:1 mqtt://b:2"})):
        result = runner.invoke(command, args, env=env)
        assert result.exit_code == 0, result.output
    assert [s.nodes for s in seen] == [(("a", 1), ("b", 2))] * 4
    result = runner.invoke(command, [])
    assert result.exit_code == 0 and seen[-1].nodes == (("127.0.0.1", 1883),)
    result = runner.invoke(command, ["--broker", "mqtt://a:1,ftp://b"])
    assert result.exit_code != 0 and "'ftp://b' is not valid" in str(result.exception)


def test_subscription_qos_is_0_or_1() -> None:
    assert BrokerSettings.from_url("mqtt://a").subscribe_qos == 1
    assert BrokerSettings.from_url("mqtt://a,mqtt://b", subscribe_qos=0).subscribe_qos == 0
    with pytest.raises(ConfigError, match="subscription QoS 2 is not supported; expected 0 or 1"):
        BrokerSettings.from_url("mqtt://a", subscribe_qos=2)


def test_starting_at_rotates_the_nodes_and_keeps_the_rest() -> None:
    settings = BrokerSettings.from_url("mqtt://u:p@a:1,mqtt://b:2,mqtt://c:3", subscribe_qos=0)
    assert settings.starting_at(1).nodes == (("b", 2), ("c", 3), ("a", 1))
    assert settings.starting_at(5).nodes == (("c", 3), ("a", 1), ("b", 2))
    assert settings.starting_at(3) == settings
    rotated = settings.starting_at(2)
    assert (rotated.username, rotated.password, rotated.subscribe_qos) == ("u", "p", 0)
