"""The configuration: schema and defaults, validation, the typed frozen pieces code below the CLI takes."""
