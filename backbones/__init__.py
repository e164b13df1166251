"""Built-in backbones. Each module is reached through the registry (``m2pt_cli.registry.BACKBONES``)."""
