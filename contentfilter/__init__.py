"""mxward contentfilter: the SMTP content filter for DATA-stage checks.

The filter daemon itself arrives with the content-filter work; this package already exists so
that content checks have their home and the packaging guards cover it.
"""
