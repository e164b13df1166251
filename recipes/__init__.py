"""The recipes bundled with m2pt and the files they name, installed as ``m2pt_cli.bundled_recipes``
(read through ``m2pt_cli.recipes``)."""
