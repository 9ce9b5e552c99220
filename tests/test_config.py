"""Settings: etc/rc.json, environment overrides, clear errors."""
import json

import pytest

from rc import config as config_module
from rc.defaults import DEFAULTS


def test_rc_json_holds_every_setting_with_its_default():
    with open(config_module.DEFAULT_CONFIG_PATH) as f:
        assert json.load(f) == DEFAULTS


def test_environment_overrides_ports_and_home(tmp_path):
    config = config_module.load(environ={"RC_TCP_PORT": "9001", "RC_WEB_PORT": "9002",
                                         "RC_HOME": str(tmp_path)})
    assert (config.tcp_port, config.web_port) == (9001, 9002)
    assert config.db_path == str(tmp_path / "db" / "rc.db")


@pytest.mark.parametrize("content, message", [
    ({"tcp_prot": 1}, "unknown setting"),
    ({"tcp_port": "80"}, "must be int"),
    ({"tcp_port": 70000}, "port number"),
    ({"offline_timeout": -1}, "negative"),
])
def test_bad_settings_are_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / "rc.json"
    path.write_text(json.dumps(content))
    with pytest.raises(config_module.ConfigError, match=message):
        config_module.load(str(path), environ={})


def test_bad_port_in_environment(tmp_path):
    with pytest.raises(config_module.ConfigError, match="RC_TCP_PORT"):
        config_module.load(environ={"RC_TCP_PORT": "eighty"})


def test_whole_numbers_are_accepted_for_seconds(tmp_path):
    path = tmp_path / "rc.json"
    path.write_text(json.dumps({"offline_timeout": 120}))
    assert config_module.load(str(path), environ={}).offline_timeout == 120.0
