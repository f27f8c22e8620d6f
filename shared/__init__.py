"""mxward's shared core: configuration, the check framework, state, DNS, logging and the CLI."""
