"""mxward policyd: the Postfix policy-delegation daemon (envelope-stage checks)."""
