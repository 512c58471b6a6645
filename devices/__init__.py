"""Device profiles shipped as package data (``edgetune.devices``): one TOML file per device."""
