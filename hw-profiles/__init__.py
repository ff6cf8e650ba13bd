"""Hardware profiles shipped with edgeserve: data only, one TOML file per device class."""
